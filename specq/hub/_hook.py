"""Register specq's HfQuantizer with transformers without importing transformers at `import specq`.

`install()` (called by specq/__init__.py) registers at once when transformers' quantizer registry
is already imported; otherwise it adds an import hook that registers right after
`transformers.quantizers.auto` is first imported (which every `from_pretrained` does). This module
imports only the standard library, so `import specq` stays cheap.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

TARGET = "transformers.quantizers.auto"
logger = logging.getLogger(__name__)


def install() -> None:
    if TARGET in sys.modules:
        _register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _register() -> None:
    try:
        from specq.hub.quantizer import register

        register()
    except Exception as e:  # never break transformers' own import because of specq
        logger.warning("specq: could not register the 'specq' quantizer with transformers: %s", e)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    """Wraps the real loader: run the module, then register specq and remove the hook."""

    def __init__(self, inner, finder):
        self._inner, self._finder = inner, finder

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._inner
        self._inner.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        _register()

    def __getattr__(self, name):  # get_source, is_package, ... for tracebacks and inspect
        return getattr(self._inner, name)
