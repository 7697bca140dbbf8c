"""Per-document filters and mappers: each takes a batch and returns a StageResult, keeping inputs intact."""
from herd.data.filters.base import DocStage
from herd.data.filters.heuristics import C4Quality, FineWebQuality, GopherQuality, GopherRepetition
from herd.data.filters.language import LanguageFilter
from herd.data.filters.nsfw import NSFWFilter
from herd.data.filters.pii import PIIMasker

__all__ = [
    "C4Quality",
    "DocStage",
    "FineWebQuality",
    "GopherQuality",
    "GopherRepetition",
    "LanguageFilter",
    "NSFWFilter",
    "PIIMasker",
]
