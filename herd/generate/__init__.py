from herd.generate.generator import Completion, ContextLengthError, Delta, Generator
from herd.generate.sampling import SamplingParams, TokenLogprob

__all__ = ["Completion", "ContextLengthError", "Delta", "Generator", "SamplingParams", "TokenLogprob"]
