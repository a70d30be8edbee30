"""specq: lossless LLM decoding with quantized self-drafts.

Public API (see docs/ARCHITECTURE.md):

    model, tok = specq.load()                       # embedded default model, Hub id, local dir or .gguf
    mm = specq.transform(model, modes=("bf16", "mxfp4", "w4a16", "w4a4"))
    specq.set_mode(mm, "mxfp4");  with specq.mode(mm, "w4a4"): ...
    out = specq.generate(mm, input_ids, max_new_tokens=256, levels=["ngram", "mxfp4", "bf16"])
    specq.save_pretrained(mm, "dir");  mm = specq.from_pretrained("dir-or-hub-id")

Names are resolved lazily so that `import specq` stays cheap (no transformers import) and so that
lower layers never import higher ones.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute"
_EXPORTS = {
    "load": "specq.loading:load",
    "transform": "specq.transform.transform:transform",
    "set_mode": "specq.transform.modes:set_mode",
    "get_mode": "specq.transform.modes:get_mode",
    "mode": "specq.transform.modes:mode",
    "generate": "specq.runtime.generate:generate",
    "save_pretrained": "specq.hub.checkpoint:save_pretrained",
    "from_pretrained": "specq.hub.checkpoint:from_pretrained",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'specq' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


# `transformers.AutoModelForCausalLM.from_pretrained(<specq checkpoint>)` works after `import specq`:
# registers the "specq" HfQuantizer when transformers loads its quantizer registry (stdlib-only hook).
from specq.hub._hook import install as _install_hf_quantizer_hook  # noqa: E402

_install_hf_quantizer_hook()
