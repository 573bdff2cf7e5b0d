"""`--quantize nf4|fp4|int8`: the base's linear layers held in 4 or 8 bits by bitsandbytes, as QLoRA loads them.

The base loads through transformers' `BitsAndBytesConfig` (with bitsandbytes 0.50 it quantizes, and runs forward
and backward, on the CPU as on GPUs). Quantized are the linear layers `--targets all-linear` names
(`models.quantized_modules`); embeddings, norms, the output head and a classifier's head stay in the compute dtype.
Only the base is quantized: every trained tensor (R, a head, LoRA's A and B) is float32, and `merge` folds the
adapter into the original checkpoint's weights, never the quantized ones.

Bytes per quantized weight (the plans, lorasb_cli/plan.py): nf4/fp4 pack two weights per byte plus a float32
absmax per block of 64 weights (0.5625 bytes); int8 one byte plus a float32 scale per output row.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import BadInputError

if TYPE_CHECKING:  # imported light: lorasb_cli/__init__.py calls silence_startup on every start
    import torch
    from torch import nn

log = logging.getLogger("lorasb")

BLOCK_4BIT = 64  # weights per absmax of bitsandbytes' 4-bit blockwise quantization (its default blocksize)
INSTALL_HINT = "pip install 'lorasb[quant]'"

# bitsandbytes' import looks for a faster CPU kernel on the hub (`kernels.get_kernel`, where the CPU has AVX512-BF16);
# offline that fails with a warning from `kernels` ("Skipping publisher trust check") and one from bitsandbytes
# ("Failed to load CPU gemm_4bit_forward"), and bitsandbytes falls back to its own kernel. Those are the only
# warnings of the two modules: raised to ERROR, the fallback is silent and every other log stays.
_STARTUP_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
# int8 matmuls cast their input to float16 and warn on every call (bitsandbytes.autograd._functions).
_INT8_LOGGER = "bitsandbytes.autograd._functions"


def silence_startup() -> None:
    """Keep bitsandbytes' import-time hub lookup quiet (PEFT and transformers import bitsandbytes whenever it is
    installed, so this runs before any stage imports them)."""
    for name in _STARTUP_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def require_bitsandbytes(kind: str) -> None:
    """Refuse `--quantize KIND` in one line (exit 2) where bitsandbytes cannot be imported."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise BadInputError(
            f"--quantize {kind} needs bitsandbytes, which is not installed ({e})", hint=INSTALL_HINT
        ) from None


def loading_kwargs(kind: str, *, dtype: torch.dtype, device: torch.device, skip: list[str]) -> dict:
    """`from_pretrained` arguments that load the base quantized as `kind` onto `device`, computing in `dtype`;
    `skip`: the modules that stay unquantized."""
    import torch
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(kind)
    if kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        if dtype != torch.float16:
            log.info("--quantize int8: bitsandbytes computes each quantized matmul in float16 (--dtype is %s)", dtype)
            logging.getLogger(_INT8_LOGGER).setLevel(logging.ERROR)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip
        )
    # bitsandbytes quantizes as the weights land on their device; a quantized model cannot be moved after.
    return {"quantization_config": config, "device_map": {"": device}}


def quantized_linear_bytes(kind: str, out_features: int, in_features: int) -> int:
    """Bytes of one quantized [out, in] weight with its quantization state (the bias is not included)."""
    entries = out_features * in_features
    if kind == "int8":
        return entries + 4 * out_features
    return (entries + 1) // 2 + 4 * -(-entries // BLOCK_4BIT)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes linear layer (its `weight` is packed: use its in/out features)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def mark_adapters_attached(model: nn.Module) -> None:
    """Let transformers' Trainer train a quantized base whose trained tensors are lorasb's own: it refuses a
    quantized model unless PEFT adapters are attached (`validate_quantization_for_training`), and LoRA-SB's R
    (or a classifier's head) are attached without PEFT. The flag is the one transformers' PEFT integration sets."""
    model._hf_peft_config_loaded = True
