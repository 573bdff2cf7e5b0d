"""lorasb: LoRA-SB fine-tuning as composable command-line stages."""

from .quantization import silence_startup

__version__ = "0.1.0"

silence_startup()  # before anything imports PEFT or transformers, which import bitsandbytes where installed
