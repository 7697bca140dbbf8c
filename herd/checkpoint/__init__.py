"""Checkpoints in Meta's, Hugging Face's and llama.cpp's (GGUF) formats: load, save, convert, build a model.

Every format loads into a `Checkpoint` whose state dict uses Meta's tensor names (those of herd.model.llama)
and reads tensors lazily, so converting streams tensor by tensor and building a model copies nothing twice.
"""
from herd.checkpoint.base import Checkpoint, LazyStateDict, expected_shapes
from herd.checkpoint.build import build_model
from herd.checkpoint.convert import convert, load_checkpoint, save_checkpoint
from herd.checkpoint.detect import FORMATS, detect_format
from herd.checkpoint.errors import CheckpointError

__all__ = [
    "FORMATS",
    "Checkpoint",
    "CheckpointError",
    "LazyStateDict",
    "build_model",
    "convert",
    "detect_format",
    "expected_shapes",
    "load_checkpoint",
    "save_checkpoint",
]
