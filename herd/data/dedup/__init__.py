"""De-duplication stages, each in three phases: keys (workers) -> plan (global, in order) -> apply (workers)."""
from herd.data.dedup.exact import ExactDedup
from herd.data.dedup.lines import LineDedup
from herd.data.dedup.minhash import MinHashDedup
from herd.data.dedup.url import URLDedup, normalize_url

__all__ = ["ExactDedup", "LineDedup", "MinHashDedup", "URLDedup", "normalize_url"]
