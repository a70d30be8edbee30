"""MultiModeLinear, mode switching, and transform() that applies a plan to an eager HF module."""
