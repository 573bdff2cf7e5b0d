"""DoRA's layer variant (PEFT's `DoraLinearVariant`): W = m ⊙ (W0 + s·B·R·A) / ‖W0 + s·B·R·A‖ over each output
row, with the trained magnitude m [m] stored as `<module>.lora_magnitude`. PEFT trains it (`peft_lora.prepare_dora`);
this is how evaluate, merge and a PEFT export apply the adapter it wrote."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..adapter import LayerVariant, LoraSBLinear

MAGNITUDE = "lora_magnitude"  # `<module>.lora_magnitude` [m]
PEFT_MAGNITUDE = "lora_magnitude_vector"  # its name in a PEFT adapter, after `base_model.model.<module>.`


class DoraVariant(LayerVariant):
    module_tensors = (MAGNITUDE,)
    peft_config: ClassVar[dict] = {"use_dora": True}
    serving_hint = "DoRA magnitudes: vLLM's LoRA serving does not apply them; serve the merged model instead"

    def forward(self, layer: LoraSBLinear, x: torch.Tensor) -> torch.Tensor:
        weight = self.merged_weight(
            layer.base.weight, layer.lora_B, layer.lora_R, layer.lora_A, layer.scale, layer.tensors
        )
        return F.linear(x, weight.to(x.dtype), layer.base.bias)

    def merged_weight(self, weight, lora_B, lora_R, lora_A, scale, tensors):
        """m [m] ⊙ (W0 + s·B·R·A) / ‖W0 + s·B·R·A‖ per output row, float32 [m, n]."""
        merged = super().merged_weight(weight, lora_B, lora_R, lora_A, scale, tensors)
        merged *= (tensors[MAGNITUDE].float() / merged.norm(dim=1))[:, None]
        return merged

    def peft_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {PEFT_MAGNITUDE: tensors[MAGNITUDE]}
