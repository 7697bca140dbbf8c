"""Code Shield: insecure-code detection (semgrep rules plus regex pre-checks) with block / warn decisions."""
from herd.safety.code_shield.languages import detect as detect_language
from herd.safety.code_shield.scanner import CodeShield, CodeShieldError, verdict_of
from herd.safety.code_shield.stream import StreamScanner, scan_stream

__all__ = ["CodeShield", "CodeShieldError", "StreamScanner", "detect_language", "scan_stream", "verdict_of"]
