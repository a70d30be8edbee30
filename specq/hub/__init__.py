"""Checkpoints: save/load, HfQuantizer registration, Hub push/pull, model card, export."""
