"""`lorasb merge`: fold a trained adapter into its base model, or export it as a PEFT LoRA adapter.

`hf`: stream the base checkpoint shard by shard and write W' = W + s·B·R·A (float32, cast to the base dtype) —
no model object and never more than about two shards in memory (docs/design.md §4). The base's shard layout is kept
unless `max_shard_size` asks for a new one. `peft`: `lora_A = A`, `lora_B = B·R`, so `PeftModel` (and every
PEFT-serving stack) reproduces the adapter. Either output is built in a hidden sibling directory and renamed
onto `out` only when complete.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__, adapter, artifacts, files, metadata, methods, models, shards
from .configs import MergeConfig
from .errors import BadInputError, IncompatibleArtifactError, NonFiniteError
from .registry import did_you_mean

log = logging.getLogger("lorasb")

FORMATS = ("hf", "peft")
OUT_DTYPES = ("float32", "bfloat16", "float16")
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_CARD_FILE = "README.md"
# The ranks vLLM's --max-lora-rank accepts (its LoRA config's choices): an adapter needs the smallest one ≥ its rank.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
# What a non-empty -o without --overwrite is told.
_OUT_HINT = "pick a new -o or pass --overwrite"

# What a merge needs from a hub repo: HF-named safetensors shards, configs, tokenizer and chat-template files,
# license and card. Not `*.safetensors`: repos such as Mistral's also carry a `consolidated.safetensors` copy.
HUB_PATTERNS = ["model*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.md", "LICENSE*"]

# Weight files of the base that are not copied: the merged shards replace them, and a stale copy of the
# unmerged weights in another format would be loaded by some tools instead.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")

# glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MB: most tensors of a shard) in the heap
# rather than handing them back, so a merge would carry about one extra shard of freed tensors
# (benchmarks/merge.py: 2.7-3.0 instead of 1.5 largest shards). Other C libraries have no malloc_trim.
try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


@artifacts.honours_allow_unverified
def merge(config: MergeConfig, progress: Callable[[int, int], None] | None = None) -> Path:
    """Merge the adapter at `config.adapter` into its base (`config.model`, default: the base it records).

    Writes an HF model directory (`format="hf"`) or a PEFT LoRA adapter (`format="peft"`) at `config.out`;
    returns that path as given (relative stays relative). `dtype` and `max_shard_size` shape the `hf` output;
    `progress(done, total)` counts tensors (hf) or modules (peft). A PEFT export from a hub base downloads nothing:
    PEFT checks its shapes at load time.
    """
    fmt = config.format
    out_dtype, shard_bytes = _hf_options(fmt, config.dtype, config.max_shard_size)
    lora = _load_mergeable(config.adapter, fmt)
    variant = methods.layer_variant(lora.meta.method)
    ref = models.resolve_model(config.model if config.model is not None else _recorded_base(lora))
    out = Path(config.out).expanduser()  # what the caller prints: as given
    # Checked before a download, so a bad -o fails at once.
    target = files.check_output_dir(
        out.resolve(), {"adapter": lora.path}, allow_nonempty=config.overwrite, hint=_OUT_HINT
    )
    _check_base(lora, ref, config.force_base)
    quantized = lora.meta.base_model.quantization
    if quantized:  # recorded in the output too: merged_from.base_model.quantization
        log.info(
            "the adapter was trained on the base quantized as %s (--quantize); it is folded into the original "
            "unquantized weights of %s",
            quantized,
            ref.id,
        )
    base = _open_base(lora, ref, target, fmt, config.trust_remote_code)
    metadata = _output_metadata(lora, ref)
    # One merge at a time into `out` (the lock beside it, as `out` may not exist yet): a second one would take
    # the first's staging folder for a killed merge's. An interrupted merge leaves at most a hidden staging
    # folder, never a partial `out`; with --overwrite the old `out` is removed only once the new one is complete.
    files.make_output_folder(target.parent)
    with files.output_lock(target.parent / f".{target.name}.lorasb.lock", "lorasb merge", target):
        files.remove_stale_staging(target)  # of a merge that was killed
        with files.atomic_folder(target, replace=config.overwrite, hint=_OUT_HINT) as tmp:
            if fmt == "hf":
                _write_hf(lora, variant, base, tmp, out_dtype, shard_bytes, metadata, progress)
            else:
                _write_peft(lora, variant, ref, tmp, metadata, progress)
    return out


def _check_base(lora: adapter.Adapter, ref: models.ModelRef, force: bool) -> None:
    """The adapter goes into the weights it was trained on, and never twice into one model: a merged checkpoint
    records the digest of what was merged into it."""
    digest = lora.meta.content_digest()
    if Path(ref.path).is_dir() and digest is not None and _merged_digest(Path(ref.path)) == digest:
        raise IncompatibleArtifactError(
            f"model '{ref.id}' already has this adapter merged into it",
            path=str(lora.path),
            hint="merge it into the base it was trained on (leave out --model: the adapter records it)",
        )
    models.check_base(lora.meta.base_model, ref, what="the adapter", path=str(lora.path), force=force)


def _merged_digest(model_dir: Path) -> str | None:
    """The digest of the adapter merged into the checkpoint at `model_dir` (None: lorasb merged nothing there)."""
    merged = artifacts.merged_from(model_dir).merged_from
    return merged.adapter_digest if merged is not None else None


def _hf_options(format: str, dtype: str | None, max_shard_size: str | None) -> tuple[torch.dtype | None, int | None]:
    """(output dtype, shard cap in bytes) of an `hf` merge, None each for "as the base has it"; checks `format`."""
    if format not in FORMATS:
        raise BadInputError(f"unknown --format '{format}'", hint=did_you_mean(format, FORMATS))
    if format == "peft" and (dtype is not None or max_shard_size is not None):
        raise BadInputError(
            "--dtype and --max-shard-size apply to --format hf only",
            hint="a PEFT export always stores float32 factors; drop those options",
        )
    return _out_dtype(dtype), shards.parse_size(max_shard_size) if max_shard_size is not None else None


def _load_mergeable(adapter_dir: str, format: str) -> adapter.Adapter:
    """The adapter at `adapter_dir`, refused when it has nothing `format` can write: no B, R, A factors (and, for
    `hf`, no full tensors either, as a full fine-tune or a head-only run has)."""
    lora = adapter.load_adapter(adapter_dir)
    if not lora.factors and not (lora.extra and format == "hf"):
        method = lora.meta.method or "?"
        raise IncompatibleArtifactError(
            f"the adapter holds no B, R, A factors (method {method})",
            path=str(lora.path),
            hint="merge it with --format hf: it has no LoRA form"
            if lora.extra
            else "pass the -o directory of lorasb train",
        )
    return lora


@dataclass(frozen=True)
class _Base:
    """The base checkpoint of a merge: its tensors by name, and what the trained model's names add to them."""

    index: shards.CheckpointIndex
    prefix: str  # base_prefix: "bert." or ""


def _open_base(
    lora: adapter.Adapter, ref: models.ModelRef, out: Path, format: str, trust_remote_code: bool
) -> _Base | None:
    """The base checkpoint, downloaded if needed and checked against the adapter and `out`; None for a PEFT
    export from a hub base, which needs no base weights (PEFT checks the shapes at load time)."""
    # A PEFT export checks shapes against a local base, but never downloads one.
    if format != "hf" and not Path(ref.path).is_dir():
        return None
    base_dir = _local_checkpoint(ref, trust_remote_code)
    files.check_output(out, {"base model": base_dir}, folder=True)
    index = shards.CheckpointIndex(base_dir)
    prefix = base_prefix(lora, index)
    _check_compatible(lora, index, prefix)
    return _Base(index, prefix)


def _output_metadata(lora: adapter.Adapter, ref: models.ModelRef) -> dict[str, str]:
    """The safetensors metadata of every output weight file: where the merge came from (`lorasb` JSON)."""
    merged = metadata.MergedMeta.from_adapter(lora.meta, base_id=ref.id, version=__version__)
    return {"format": "pt", artifacts.METADATA_KEY: json.dumps(merged.to_json(), sort_keys=True)}


def _write_hf(
    lora: adapter.Adapter,
    variant: adapter.LayerVariant,
    base: _Base,
    out_dir: Path,
    out_dtype: torch.dtype | None,
    shard_bytes: int | None,
    metadata: dict[str, str],
    progress: Callable[[int, int], None] | None,
) -> None:
    """An HF model directory: the merged weights, the base's other files, its config edited to match them."""
    _write_merged(lora, variant, base.index, base.prefix, out_dir, out_dtype, shard_bytes, metadata, progress)
    _copy_non_weights(base.index.directory, out_dir)
    if out_dtype is not None:
        _set_config_dtype(out_dir / "config.json", out_dtype)
    if lora.meta.labels is not None:
        _set_classifier_config(out_dir / "config.json", lora.meta.architecture, lora.meta.labels)


def merge_weight(
    weight: torch.Tensor,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor,
    lora_A: torch.Tensor,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    variant: adapter.LayerVariant = adapter.PLAIN,
    tensors: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The merged weight of one module, computed in float32 by its layer `variant` (W [m, n] + s·B [m, r]·R [r, r]·
    A [r, n] unless the method declares another, reading the module's `tensors`) and cast to `dtype` (default: W's
    dtype)."""
    return variant.merged_weight(weight, lora_B, lora_R, lora_A, scale, tensors or {}).to(dtype or weight.dtype)


def _out_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in OUT_DTYPES:
        raise BadInputError(f"unknown --dtype '{name}'", hint=did_you_mean(name, OUT_DTYPES))
    return models.DTYPES[name]


def _recorded_base(lora: adapter.Adapter) -> str:
    """The base model id or path the adapter was trained on (litgpt's merge finds it the same way)."""
    base = lora.meta.base_model.id
    if not base:
        raise BadInputError(
            "the adapter does not record its base model", path=str(lora.path), hint="pass the base with --model"
        )
    if os.path.isabs(base) and not os.path.isdir(base):
        raise BadInputError(
            f"the adapter's base model directory {base} no longer exists",
            path=str(lora.path),
            hint="pass the base model's directory or hub id with --model",
        )
    return base


def _local_checkpoint(ref: models.ModelRef, trust_remote_code: bool) -> Path:
    """A local directory holding the base checkpoint: `ref.path` itself, or a hub snapshot in the HF cache."""
    if Path(ref.path).is_dir():
        return Path(ref.path)
    from huggingface_hub import snapshot_download

    # A model with its own code needs that code beside the merged weights to load.
    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(ref.path, allow_patterns=patterns))
    except (OSError, ValueError) as e:  # hub errors (offline, unknown or gated repo, network) are OSErrors
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 is set: pass a local model directory with --model"
            if offline
            else "check the id and your network, or pass a local model directory with --model"
        )
        raise BadInputError(f"cannot download base model '{ref.id}': {str(e).splitlines()[0]}", hint=hint) from e


def base_prefix(lora: adapter.Adapter, index: shards.CheckpointIndex) -> str:
    """What the trained model's names add to the checkpoint's: "bert." when a BertForSequenceClassification
    was trained over a bare BertModel checkpoint (as sentence-transformers ships them), else ""."""
    for name in [f"{module}.weight" for module in lora.factors] + list(lora.extra):
        first, _, rest = name.partition(".")
        if name not in index and rest in index:
            return first + "."
    return ""


def _check_compatible(lora: adapter.Adapter, index: shards.CheckpointIndex, prefix: str) -> None:
    """Every adapted module must have a floating `<module>.weight` of shape (B rows, A columns) in the base."""
    weights = {module: f"{module}.weight".removeprefix(prefix) for module in lora.factors}
    shapes = {module: index.shape(name) for module, name in weights.items() if name in index}
    hint = f"pass the base the adapter was trained on with --model (recorded: {_recorded_id(lora)})"
    artifacts.check_fits(lora.factors, shapes, model="the base model", path=str(index.directory), hint=hint)
    for name in weights.values():
        if not index.dtype(name).is_floating_point:
            raise IncompatibleArtifactError(
                f"weight '{name}' of the base model is {index.dtype(name)}, not floating point (quantized?)",
                path=str(index.directory),
                hint="merge into the unquantized base model",
            )
    for name, tensor in lora.extra.items():
        name = name.removeprefix(prefix) if name.removeprefix(prefix) in index else name
        if name in index and index.shape(name) != tuple(tensor.shape):
            raise IncompatibleArtifactError(
                f"adapter tensor '{name}' has shape {tuple(tensor.shape)}, the base model's {index.shape(name)}",
                path=str(index.directory),
                hint=hint,
            )


def _recorded_id(lora: adapter.Adapter) -> str:
    return lora.meta.base_model.id


def _write_merged(
    lora: adapter.Adapter,
    variant: adapter.LayerVariant,
    index: shards.CheckpointIndex,
    prefix: str,
    out_dir: Path,
    out_dtype: torch.dtype | None,
    shard_bytes: int | None,
    metadata: dict[str, str],
    progress: Callable[[int, int], None] | None,
) -> None:
    """Write the merged weights: the base's shards and index (same tensors; names with the trained model's
    `prefix`), or new shards of at most `shard_bytes` tensor bytes."""
    tensors = _MergedTensors(lora, variant, index, prefix, out_dtype, progress)
    if shard_bytes is not None:
        with shards.ShardWriter(out_dir, shard_bytes, metadata) as writer:
            for _, name, tensor in tensors:
                writer.add(name, tensor)
            writer.finalize()
    else:
        _write_base_layout(tensors, index, out_dir, metadata)


class _MergedTensors:
    """The tensors of a merged checkpoint, produced one at a time: each base tensor in the base's shard order
    (merged where the adapter has factors for it, replaced where it holds the tensor in full), then the adapter's
    tensors the base lacks, in its last shard."""

    def __init__(
        self,
        lora: adapter.Adapter,
        variant: adapter.LayerVariant,
        index: shards.CheckpointIndex,
        prefix: str,
        out_dtype: torch.dtype | None,
        progress: Callable[[int, int], None] | None,
    ):
        self.lora, self.variant, self.index, self.prefix = lora, variant, index, prefix
        self.out_dtype, self.progress = out_dtype, progress
        # Checkpoint name → adapted module, for the weights that get W + s·B·R·A.
        self.targets = {f"{module}.weight".removeprefix(prefix): module for module in lora.factors}
        # Extra tensors by their checkpoint names: those the base has replace its tensors (a full fine-tune); those
        # it lacks (a classification head on a causal-LM checkpoint) go into the last shard, in the base's dtype.
        self.extra = {
            (n.removeprefix(prefix) if n.removeprefix(prefix) in index else n): t for n, t in lora.extra.items()
        }
        head_dtype = out_dtype or index.dtype(next(iter(self.targets), None) or index.names()[0])
        self.added = {name: t.to(head_dtype) for name, t in self.extra.items() if name not in index}
        self.last_shard = index.shard_files()[-1]
        self.order = [(shard, name) for shard in index.shard_files() for name in index.tensors_in(shard)]
        self.order += [(self.last_shard, name) for name in self.added]

    def __iter__(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(shard file, output name, output tensor) in the base's order; `progress(done, total)` after each."""
        for done, (shard, name) in enumerate(self.order, start=1):
            if _malloc_trim is not None:
                _malloc_trim(0)  # the tensors freed since the last call, e.g. a saved shard, go back to the OS
            yield shard, name if name in self.added else self.prefix + name, self.tensor(name)
            if self.progress is not None:
                self.progress(done, len(self.order))

    def tensor(self, name: str) -> torch.Tensor:
        """The output tensor of checkpoint tensor `name`, in `out_dtype` (default: the base's dtype)."""
        if name in self.added:
            return self.added[name]
        if name in self.extra:
            return self.extra[name].to(self.out_dtype or self.index.dtype(name))
        # One memory map per tensor (`get`, not `iter_tensors`): a base weight's pages leave memory as soon as
        # its merged copy exists, instead of the whole input shard staying resident until the shard is saved.
        tensor = self.index.get(name)
        if name in self.targets:
            return self._merged(self.targets[name], tensor)
        if self.out_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.out_dtype)
        return tensor

    def _merged(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        """W' = W + s·B·R·A of `module` (as the method's layer variant computes it), refused when it is not finite."""
        lora = self.lora
        own = lora.module_tensors.get(module)
        merged = merge_weight(weight, *lora.factors[module], lora.scale, self.out_dtype, self.variant, own)
        if not torch.isfinite(merged).all():
            raise NonFiniteError(
                f"NaN/Inf in the merged weight of module '{module}'",
                path=str(lora.path),
                hint="check the adapter and base weights; if the values overflow, merge with --dtype float32",
            )
        return merged


def _write_base_layout(
    tensors: _MergedTensors, index: shards.CheckpointIndex, out_dir: Path, metadata: dict[str, str]
) -> None:
    """Save `tensors` into shards of the base's names, and the base's index (if it has one) with the merged
    names, sizes and hashes. Only one output shard is held in memory at a time."""
    total_size = 0  # tensor bytes, as the index records them
    hashes: dict[str, str] = {}  # recorded in each shard and the index, so `inspect --verify` can check them
    weight_map: dict[str, str] = {}
    for shard, group in itertools.groupby(tensors, key=lambda item: item[0]):
        # Deleted right after saving, so no shard's tensors outlive it while the next shard is read.
        shard_tensors = {name: tensor.contiguous() for _, name, tensor in group}
        total_size += sum(t.numel() * t.element_size() for t in shard_tensors.values())
        shard_hashes = shards.tensor_hashes(shard_tensors)
        hashes |= shard_hashes
        save_file(shard_tensors, out_dir / shard, metadata=shards.hashed_metadata(metadata, shard_hashes))
        weight_map.update(dict.fromkeys(shard_tensors, shard))
        del shard_tensors
    base_index = index.directory / shards.INDEX_FILE
    if base_index.is_file():  # a single-file base has none, and neither has its merge
        layout = json.loads(base_index.read_text())
        shards.write_index(out_dir, weight_map, total_size=total_size, hashes=hashes, base=layout)


def _copy_non_weights(base_dir: Path, out_dir: Path) -> None:
    """Copy config, generation config, tokenizer and every other non-weight file (hidden ones excepted)."""
    for path in sorted(base_dir.rglob("*")):
        rel = path.relative_to(base_dir)
        is_weight = path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(
            (".safetensors.index.json", ".bin.index.json")
        )
        if not path.is_file() or is_weight or any(part.startswith(".") for part in rel.parts):
            continue
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out_dir / rel)  # follows the HF cache's symlinks to the blobs


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """Record the new dtype under the key the config uses (`dtype` in transformers 5, `torch_dtype` before)."""
    config = json.loads(config_path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _set_classifier_config(config_path: Path, architecture: str, labels: list[str]) -> None:
    """Make the merged config load as the trained classifier, with its class names."""
    config = json.loads(config_path.read_text())
    config["architectures"] = [architecture]
    config["id2label"] = {str(i): label for i, label in enumerate(labels)}
    config["label2id"] = {label: i for i, label in enumerate(labels)}
    config["problem_type"] = "regression" if len(labels) == 1 else "single_label_classification"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _write_peft(
    lora: adapter.Adapter,
    variant: adapter.LayerVariant,
    ref: models.ModelRef,
    out_dir: Path,
    metadata: dict[str, str],
    progress: Callable[[int, int], None] | None,
) -> None:
    """PEFT LoRA: `lora_A` = A [r, n], `lora_B` = B·R [m, r], scale lora_alpha / r = s (float32 throughout)."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for done, (module, (lora_B, lora_R, lora_A)) in enumerate(lora.factors.items(), start=1):
        # Adapter factors are float32 (load_adapter), so B·R is computed and stored in float32.
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (lora_B @ lora_R).contiguous()
        own = variant.peft_tensors(lora.module_tensors.get(module, {}))
        tensors |= {f"base_model.model.{module}.{name}": tensor.contiguous() for name, tensor in own.items()}
        ranks[module] = lora_R.shape[0]
        if progress is not None:
            progress(done, len(lora.factors))
    # Trained full tensors (a classification head) are PEFT's `modules_to_save`, stored under their own names.
    for name, tensor in lora.extra.items():
        tensors[f"base_model.model.{name}"] = tensor.contiguous()
    heads = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in lora.extra))
    config = _peft_config(lora, variant, ref, ranks, heads)
    hashed = shards.hashed_metadata(metadata, shards.tensor_hashes(tensors))
    save_file(tensors, out_dir / PEFT_WEIGHTS_FILE, metadata=hashed)
    (out_dir / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    hints = serving_hints(max(ranks.values()), variant=variant, modules_to_save=heads)
    for line in hints:
        log.info("serving: %s", line)
    card = [f"# LoRA adapter for {ref.id}", "", "Exported by `lorasb merge --format peft` (LoRA-SB: lora_B = B·R).", ""]
    (out_dir / PEFT_CARD_FILE).write_text("\n".join([*card, "## Serving", "", *(f"- {h}" for h in hints)]) + "\n")


def _peft_config(
    lora: adapter.Adapter, variant: adapter.LayerVariant, ref: models.ModelRef, ranks: dict[str, int], heads: list[str]
) -> dict:
    """PEFT's adapter_config.json for `ranks` {module: r} and `heads` (trained full modules: modules_to_save): the
    most common rank as `r`, the others in `rank_pattern`; lora_alpha = s·r, so PEFT's lora_alpha / r is s."""
    r = Counter(ranks.values()).most_common(1)[0][0]

    def alpha(rank: int) -> int | float:
        value = lora.scale * rank
        return int(value) if float(value).is_integer() else value

    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if heads else "CAUSAL_LM",
        # What from_pretrained loads: the hub id of a hub model, the absolute folder of a local or bundled one (an
        # alias means nothing to PEFT's AutoPeftModel*, which would look it up on the hub).
        "base_model_name_or_path": ref.path,
        "r": r,
        "lora_alpha": alpha(r),
        "target_modules": list(lora.factors),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: alpha(k) for m, k in ranks.items() if k != r},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": heads or None,
        "inference_mode": True,
    } | variant.peft_config


def serving_hints(rank: int, *, variant: adapter.LayerVariant, modules_to_save: list[str]) -> list[str]:
    """What a server needs to load the export: vLLM's `--max-lora-rank` (the smallest it accepts that holds
    `rank`) and what vLLM's LoRA support lacks (a layer variant's own tensors, trained full modules)."""
    fitting = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    hints = [
        f"vLLM: --enable-lora --max-lora-rank {fitting[0]} (rank {rank})"
        if fitting
        else f"vLLM: rank {rank} exceeds the largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); merge instead"
    ]
    if variant.serving_hint:
        hints.append(variant.serving_hint)
    if modules_to_save:
        hints.append(f"trained full modules ({', '.join(modules_to_save)}): serve the merged model instead")
    hints.append("PEFT / transformers: PeftModel.from_pretrained(base, this_folder)")
    return hints
