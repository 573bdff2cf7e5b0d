"""lorasb: LoRA-SB fine-tuning as composable command-line stages."""

__version__ = "0.1.0"
