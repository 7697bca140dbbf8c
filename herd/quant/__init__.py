"""Quantized weight formats, applied to a built model from outside by swapping its linear layers."""
from herd.quant.int8 import Int8Linear, quantize_int8

__all__ = ["Int8Linear", "quantize_int8"]
