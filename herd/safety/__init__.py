"""Safety: Llama Guard (conversation classifier), Prompt Guard (injection / jailbreak scores) and Code Shield
(insecure-code detection), usable on their own or around a model (`Shields`)."""
from herd.safety.code_shield import CodeShield
from herd.safety.llama_guard import CATEGORIES, LlamaGuard, llama_guard_prompt, parse_llama_guard

__all__ = ["CATEGORIES", "CodeShield", "LlamaGuard", "llama_guard_prompt", "parse_llama_guard"]
