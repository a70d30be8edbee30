"""Ops registered with torch.library (reference impls on any device, Triton on CUDA, fake impls)."""
