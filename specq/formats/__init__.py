"""Numeric formats: pure tensor math (quantize, pack, dequantize). No nn.Module, no transformers."""
