"""transformers integration: `AutoModelForCausalLM.from_pretrained(specq_checkpoint)` after `import specq`.

transformers picks a quantizer by `config.json["quantization_config"]["quant_method"]`. We register
"specq" (a QuantizationConfigMixin subclass and an HfQuantizer subclass). Before weights are loaded,
the quantizer swaps the planned modules of the meta-device skeleton for EMPTY MultiModeLinears
(`apply_plan(..., quantize=False)`); transformers then fills their packed buffers from the shards by
name, exactly as it fills any parameter. Only pre-quantized checkpoints are supported (to quantize a
model, use `specq.transform` or `specq convert`).

`specq.from_pretrained` is the richer loader (partial modes, checksums, Hub pull of only the needed
shards); this path loads every mode the checkpoint holds.
"""

from __future__ import annotations

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from specq.hub.layout import QUANT_METHOD, quantization_config


class SpecqConfig(QuantizationConfigMixin):
    """Holds config.json's quantization_config verbatim (modes, formats, plan, ...)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("quant_method", QUANT_METHOD)
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict:
        import copy

        return copy.deepcopy(self.__dict__)


class SpecqHfQuantizer(HfQuantizer):
    requires_calibration = True  # pre-quantized checkpoints only

    def validate_environment(self, *args, **kwargs):
        # raises a clear CheckpointError / FormatVersionError for a damaged or too-new checkpoint
        quantization_config({"quantization_config": self.quantization_config.to_dict()}, "this checkpoint")
        if not isinstance(getattr(self.quantization_config, "plan", None), dict):
            from specq.hub.errors import CheckpointError

            raise CheckpointError("this checkpoint's quantization_config has no specq plan; it is damaged.")

    def update_dtype(self, dtype):
        import torch

        if dtype is None or dtype == "auto":
            name = self.quantization_config.plan.get("dtype")
            return getattr(torch, name) if name else dtype
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        from specq.transform.transform import apply_plan

        apply_plan(model, self.quantization_config.plan, quantize=False, modes=self.quantization_config.modes)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    @property
    def is_serializable(self):
        return False  # save with specq.save_pretrained (it writes the mode-grouped shards and checksums)

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Register "specq" with transformers (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(SpecqConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(SpecqHfQuantizer)
