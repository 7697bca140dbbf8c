"""Safety: Llama Guard (conversation classifier), Prompt Guard (injection / jailbreak scores) and Code Shield
(insecure-code detection), usable on their own or around a model (`Shields`)."""
from herd.safety.code_shield import CodeShield
from herd.safety.llama_guard import CATEGORIES, LlamaGuard, llama_guard_prompt, load_guard, parse_llama_guard
from herd.safety.prompt_guard import PromptGuard
from herd.safety.shields import Shields

__all__ = ["CATEGORIES", "CodeShield", "LlamaGuard", "PromptGuard", "Shields", "llama_guard_prompt", "load_guard",
           "parse_llama_guard"]
