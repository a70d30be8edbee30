"""MultiModeLinear, mode switching, and transform() that applies a plan to an eager HF module.

`specq.transform` is both this package and the public function `specq.transform(model, ...)`:
importing any submodule (e.g. `specq.transform.modes`) binds the package to the attribute
`specq.transform`, which would shadow the lazily exported function. So the package itself is
callable and forwards to `specq.transform.transform.transform`.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from specq.transform.transform import transform as _transform

        return _transform(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
