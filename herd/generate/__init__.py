from herd.generate.generator import ContextLengthError, EngineConfig, Generator, QueueFullError, Request
from herd.generate.sampling import SamplingParams, TokenLogprob
from herd.generate.sequence import Completion, Delta
from herd.generate.speculative import SpeculativeConfig

__all__ = ["Completion", "ContextLengthError", "Delta", "EngineConfig", "Generator", "QueueFullError", "Request",
           "SamplingParams", "SpeculativeConfig", "TokenLogprob"]
