"""Checkpoints: save/load, HfQuantizer registration, Hub push/pull, model card, export.

    checkpoint.py  save_pretrained / from_pretrained (exported as specq.save_pretrained / specq.from_pretrained)
    layout.py      file layout, shard groups per mode, quantization_config validation, checksums
    push.py        push_to_hub (one commit, resumable) / pull (only the shards of the requested modes)
    quantizer.py   the "specq" HfQuantizer for transformers (registered on `import specq` via _hook.py)
    card.py        README.md model card      info.py  what `specq inspect` shows
    export.py      compressed-tensors export  convert.py  what `specq convert` runs
    errors.py      error classes and the exit codes of the commands

Submodules are imported on use, so `import specq` stays cheap.
"""
