"""Model aliases, loading, target-module resolution and fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from . import bundled, data, quantization, shards
from .errors import BadInputError, IncompatibleArtifactError
from .metadata import ArtifactMeta, BaseIdentity
from .registry import did_you_mean

log = logging.getLogger("lorasb")

# Short names for the models of the paper (docs/design.md §3). Values are hub ids; bundled.py adds offline ones.
ALIASES: dict[str, str] = {
    "mistral": "mistralai/Mistral-7B-v0.1",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "gemma2-9b": "google/gemma-2-9b",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "roberta-large": "FacebookAI/roberta-large",
}
# What each aliased hub checkpoint is and what its first use downloads (sizes from the hub's file listings),
# for `lorasb models`; hub ids without an entry are listed as they are.
HUB_MODELS: dict[str, tuple[str, str]] = {
    "mistralai/Mistral-7B-v0.1": ("Mistral-7B base, 7.2B params (the paper's)", "14.5 GB safetensors, bf16"),
    "google/gemma-2-9b": ("Gemma-2 9B base, 9.2B params (the paper's)", "safetensors; gated: accept the license first"),
    "meta-llama/Llama-3.2-3B": ("Llama-3.2 3B base, 3.2B params (the paper's)", "6.4 GB safetensors, bf16; gated"),
    "FacebookAI/roberta-large": ("RoBERTa-large encoder, 355M params (the paper's GLUE)", "1.4 GB safetensors, fp32"),
}

TARGET_PRESETS = ("all-linear", "attention")
# Classification heads (PEFT's modules_to_save for SEQ_CLS): trained in full, never adapted.
HEAD_MODULES = ("classifier", "score")
_ATTENTION_PARTS = {"self_attn", "attn", "attention", "self_attention"}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: `id` is what provenance records (hub id or absolute local path)."""

    id: str
    path: str  # what `from_pretrained` is given: a local directory or a hub id
    source: dict | None = None  # a bundled model's package, version and file hash (docs/design.md §7)

    def provenance(self, fingerprint: str, quantization: str | None = None) -> BaseIdentity:
        """The `base_model` of an artifact's metadata: `id` (a path or hub id, for people), the target
        `fingerprint` and the checkpoint's `weights_digest`, which stages match instead of the id; `quantization`
        (nf4, fp4, int8) where the artifact was made on the base loaded quantized (--quantize)."""
        return BaseIdentity(
            id=self.id,
            fingerprint=fingerprint,
            weights_digest=weights_digest(self),
            source=self.source,
            quantization=quantization,
        )


def resolve_model(spec: str) -> ModelRef:
    """Turn `--model` (local directory, alias or hub id) into a ModelRef, or raise BadInputError."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInputError(
                "not a Hugging Face model directory: config.json is missing",
                path=str(path),
                hint="pass a directory written by save_pretrained, an alias or a hub id",
            )
        resolved = str(path.resolve())
        return ModelRef(id=resolved, path=resolved)
    if spec in bundled.BUNDLED:
        directory, source = bundled.materialize(bundled.BUNDLED[spec])
        return ModelRef(id=spec, path=str(directory), source=source)
    if spec in ALIASES:
        return ModelRef(id=ALIASES[spec], path=ALIASES[spec])
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.exists()
    if looks_like_hub_id:
        return ModelRef(id=spec, path=spec)
    raise BadInputError(
        f"unknown model '{spec}': not a local directory, an alias or a hub id",
        hint=did_you_mean(spec, sorted({*ALIASES, *bundled.BUNDLED})),
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (bf16 matmuls are slow there) and bfloat16 on accelerators."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise BadInputError(f"unknown --dtype '{name}'", hint=did_you_mean(name, ["auto", *DTYPES]))
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BadInputError(f"unknown --device '{name}'", hint="use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and device.index is None and not torch.cuda.is_available():
        raise BadInputError(f"--device {name}: this machine has no CUDA device", hint="devices here: cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        here = ", ".join(["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))])
        raise BadInputError(f"--device {name}: no such device", hint=f"devices here: {here}")
    return device


def placement(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """`--device` and `--dtype` resolved: where a stage runs the model and in which compute dtype."""
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)


def load_model(
    ref: ModelRef,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    head: str | None = None,
    labels: Sequence[str] | None = None,
    seed: int | None = None,
) -> tuple[nn.Module, object]:
    """The model every stage runs, and its tokenizer, on `device` in `dtype`; every loading failure becomes a
    one-line BadInputError. The one loader of lorasb: estimate, train, evaluate and decompose call it.

    Weights are read from safetensors only (docs/design.md §2): a pickle checkpoint (.bin/.pt) is refused unless
    `allow_pickle`, and then transformers reads it with torch.load(weights_only=True). A checkpoint missing weights
    of its architecture is refused (`_check_complete`). `quantize` (nf4, fp4, int8) loads the linear layers of
    `quantized_modules` quantized by bitsandbytes (lorasb_cli/quantization.py).

    `head` "causal-lm" loads AutoModelForCausalLM, "sequence-classification" AutoModelForSequenceClassification
    (default: the latter when `labels` are given). With `labels` the classifier gets a new head of one output per
    label (one: regression), drawn with `seed` when given (the global RNG is left as it was), so the same seed gives
    the same head; without, the checkpoint's own head.
    """
    import transformers

    head = head or ("sequence-classification" if labels is not None else "causal-lm")
    if labels is not None:
        require_classifier(ref, trust_remote_code=trust_remote_code)
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": not allow_pickle or None}
    if not allow_pickle and Path(ref.path).is_dir() and not any(Path(ref.path).glob("*.safetensors")):
        raise shards.pickle_checkpoint_error(Path(ref.path), option="--allow-pickle")
    if head == "sequence-classification" and labels is not None:
        kwargs |= _head_kwargs(labels)
    if quantize is not None:
        skip = _unquantized_linears(ref, trust_remote_code=trust_remote_code, head=head, labels=labels)
        kwargs |= quantization.loading_kwargs(quantize, dtype=dtype, device=device, skip=skip)
    new_head = labels is not None and seed is not None
    with torch.random.fork_rng(devices=[], enabled=new_head):
        if new_head:
            torch.manual_seed(seed)
        model, tokenizer = _from_pretrained(ref, kwargs, trust_remote_code=trust_remote_code, head=head, labels=labels)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss, so any token id serves.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    if quantize is None:  # a quantized model was placed as it loaded
        model.to(device)
    model.eval()
    return model, tokenizer


def _head_kwargs(labels: Sequence[str]) -> dict:
    """from_pretrained arguments of a new classification head: one output per label (one: regression)."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(map(str, labels))),
        "label2id": {str(label): i for i, label in enumerate(labels)},
        "problem_type": "regression" if len(labels) == 1 else "single_label_classification",
    }


def _from_pretrained(
    ref: ModelRef, kwargs: dict, *, trust_remote_code: bool, head: str, labels: Sequence[str] | None
) -> tuple[nn.Module, object]:
    """(model with the `head`'s Auto class, tokenizer) from `ref.path`; unreadable weights, a missing model or
    a network failure become one-line BadInputErrors."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if head == "sequence-classification" else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
        # No load report: what it lists is checked below (_check_complete), a missing new head expected.
        transformers.utils.logging.set_verbosity_error()
        model, info = auto.from_pretrained(ref.path, output_loading_info=True, **kwargs)
    except SafetensorError as e:
        raise _unreadable_weights(ref, e) from e
    except pickle.UnpicklingError as e:  # --allow-pickle: torch.load(weights_only=True) met more than tensors
        raise BadInputError(
            f"cannot load model '{ref.id}': its pickle weights hold code or objects, not just tensors",
            hint="never load such a file: get safetensors weights from a source you trust",
        ) from e
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 is set: download it first or pass a local directory"
            if offline
            else f"check the name, your network and that the model has a {head} head"
        )
        raise BadInputError(f"cannot load model '{ref.id}': {str(e).splitlines()[0]}", hint=hint) from e
    except RuntimeError as e:  # a weight whose shape the config contradicts (e.g. another vocab_size)
        raise BadInputError(
            f"cannot load model '{ref.id}': its weights do not match its config ({str(e).splitlines()[0]})",
            hint="the config.json belongs to another checkpoint: copy the model folder again",
        ) from e
    _check_complete(ref, info, new_head=labels is not None)
    return model, tokenizer


def _check_complete(ref: ModelRef, info: dict, *, new_head: bool) -> None:
    """Refuse a checkpoint that lacks weights of its own architecture, which transformers would fill with random
    ones. Only a new classifier head may be missing, and only then may a checkpoint hold weights the model does
    not use (the pretraining head a classifier replaces, e.g. RoBERTa's lm_head)."""
    missing = sorted(k for k in info["missing_keys"] if not (new_head and k.split(".")[0] in HEAD_MODULES))
    unexpected = [] if new_head else sorted(info["unexpected_keys"])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    for problem, keys in (("lacks", missing), ("has unexpected", unexpected), ("has mis-shaped", mismatched)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise BadInputError(
                f"model '{ref.id}' {problem} weights: {shown}",
                path=ref.path if Path(ref.path).is_dir() else None,
                hint="the checkpoint is incomplete or belongs to another config: copy or download it again",
            )


def model_config(ref: ModelRef, *, trust_remote_code: bool = False):
    """The model's transformers config (config.json), read without weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInputError(
            f"cannot read the config of model '{ref.id}': {str(e).splitlines()[0]}",
            hint="pass a local directory with its config.json (no weights needed), an alias or a hub id",
        ) from e


def architectures(ref: ModelRef, *, trust_remote_code: bool = False) -> list[str]:
    """The `architectures` of the model's config.json (e.g. ["LlamaForCausalLM"]), read without weights."""
    return list(getattr(model_config(ref, trust_remote_code=trust_remote_code), "architectures", None) or [])


# Config fields that bound a model's absolute positions, by architecture family (Llama/BERT, GPT-2, others).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length")
_NO_LIMIT = 10**9  # transformers' "no model_max_length" sentinel is 1e30


def position_limit(ref: ModelRef, *, trust_remote_code: bool = False) -> int | None:
    """Tokens one sequence may hold: the config's position limit, or the tokenizer's `model_max_length` where that
    is smaller (RoBERTa: 514 positions, 2 of them reserved, 512 tokens); None when neither says."""
    from transformers.utils import cached_file

    config = model_config(ref, trust_remote_code=trust_remote_code)
    text = getattr(config, "text_config", None) or config  # multimodal configs nest the language model's
    limits = [getattr(text, name) for name in _POSITION_FIELDS if isinstance(getattr(text, name, None), int)]
    with contextlib.suppress(OSError, ValueError):
        found = cached_file(ref.path, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False)
        tokenizer_limit = json.loads(Path(found).read_text()).get("model_max_length") if found else None
        if isinstance(tokenizer_limit, (int, float)) and tokenizer_limit < _NO_LIMIT:
            limits.append(int(tokenizer_limit))
    return min(limits) if limits else None


def fit_max_length(requested: int | None, default: int, ref: ModelRef, *, trust_remote_code: bool = False) -> int:
    """--max-length within the model: `requested` as given (an error past the model's position limit), or when
    not given `default` capped at that limit, said on stderr when it is."""
    if requested is not None:
        data.check_max_length(requested)
    limit = position_limit(ref, trust_remote_code=trust_remote_code)
    if requested is None:
        if limit is not None and limit < default:
            log.info("--max-length %d: the position limit of %s (the default is %d)", limit, ref.id, default)
            return limit
        return default
    if limit is not None and requested > limit:
        raise BadInputError(
            f"--max-length {requested} is beyond the {limit} positions of model '{ref.id}'",
            hint=f"pass --max-length {limit} or less, or leave it out",
        )
    return requested


def resolve_targets(model: nn.Module, targets: str) -> list[str]:
    """Module paths of the linear layers `--targets` selects, in model order.

    `all-linear`: every nn.Linear except the output head (LM head / classifier);
    `attention`: those inside attention blocks; otherwise a comma list of module-name suffixes.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and name.split(".")[0] not in HEAD_MODULES
    ]
    if targets == "all-linear":
        selected = linears
    elif targets == "attention":
        selected = [n for n in linears if _ATTENTION_PARTS & set(n.split("."))]
    else:
        suffixes = [s.strip() for s in targets.split(",") if s.strip()]
        selected = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
        for suffix in suffixes:
            if not any(n == suffix or n.endswith("." + suffix) for n in selected):
                raise BadInputError(
                    f"--targets '{suffix}' matches no linear module of the model",
                    hint=f"use all-linear, attention or suffixes such as {_suffix_examples(linears)}",
                )
    if not selected:
        raise BadInputError(
            f"--targets '{targets}' matches no linear module of the model",
            hint=f"use a comma list of suffixes such as {_suffix_examples(linears)}",
        )
    return selected


def _suffix_examples(names: list[str]) -> str:
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n.rsplit(".", 1)[-1], None)
    return ",".join(list(seen)[:8]) or "(the model has no linear layers)"


def linear_shape(module: nn.Linear) -> tuple[int, int]:
    """(out_features, in_features) = (m, n) of a linear layer's weight, also where the weight is stored packed
    (a bitsandbytes 4-bit layer holds it as [m·n/2, 1] bytes)."""
    return module.out_features, module.in_features


def target_shapes(model: nn.Module, modules: list[str]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) = (m, n) of each target's weight."""
    named = dict(model.named_modules())
    return {name: linear_shape(named[name]) for name in modules}


def parameter_count(model: nn.Module) -> int:
    """The model's parameters, each tied one once; a quantized linear layer's weight counts its m·n entries, not
    its packed bytes."""
    seen: set[int] = set()
    count = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            packed = name == "weight" and quantization.is_quantized(module)
            count += module.out_features * module.in_features if packed else param.numel()
    return count


def quantized_modules(model: nn.Module) -> list[str]:
    """The linear layers `--quantize` quantizes: those `--targets all-linear` names (never the output head, a
    classifier's head or embeddings)."""
    return resolve_targets(model, "all-linear")


def _unquantized_linears(
    ref: ModelRef, *, trust_remote_code: bool, head: str, labels: Sequence[str] | None
) -> list[str]:
    """The linear layers of `ref` that `--quantize` leaves in the compute dtype, from its config (meta device)."""
    model = meta_model(ref, trust_remote_code=trust_remote_code, head=head, labels=labels)
    kept = set(quantized_modules(model))
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in kept]


def meta_model(
    ref: ModelRef, *, trust_remote_code: bool = False, head: str = "causal-lm", labels: Sequence[str] | None = None
) -> nn.Module:
    """The model of `ref` built from its config.json on the meta device (with a head of one output per label when
    `labels` are given): shapes, no weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if head == "sequence-classification" else AutoModelForCausalLM
    config = model_config(ref, trust_remote_code=trust_remote_code)
    if labels is not None:
        config.num_labels = len(labels)
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def fingerprint(shapes: dict[str, tuple[int, int]]) -> str:
    """A short hash of target module names and weight shapes: equal for the same architecture and targets."""
    blob = json.dumps(sorted((name, list(shape)) for name, shape in shapes.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Elements of each tensor's first row that weights_digest reads: ≤ 16 KiB of a float32 row, ~3 MB for a 7B model.
_DIGEST_ROW_ELEMENTS = 4096


def weights_digest(ref: ModelRef) -> str | None:
    """A short hash of the checkpoint's content: every tensor's name, dtype, shape and the leading elements of its
    first row, read lazily from the safetensors files (no full read: a slice per tensor).

    The same files in two folders (two machines) agree; another checkpoint of the same architecture (other random
    weights, a fine-tune, a merge) differs, since every changed tensor changes in its first row too. None where no
    local safetensors checkpoint is found (a hub model not in the cache, pickle weights).
    """
    from safetensors import safe_open

    from .errors import LorasbError

    directory = _local_checkpoint(ref)
    try:
        index = shards.CheckpointIndex(directory) if directory is not None else None
    except LorasbError as e:
        log.debug("no weights digest of %s: %s", ref.id, e)
        index = None
    if index is None:
        return None
    h = hashlib.sha256()
    for shard in index.shard_files():
        try:
            with safe_open(index.directory / shard, framework="pt") as f:
                for name in sorted(index.tensors_in(shard)):
                    piece = f.get_slice(name)
                    shape = piece.get_shape()
                    if not shape:  # a scalar
                        row = f.get_tensor(name)
                    else:
                        row = piece[:1, :_DIGEST_ROW_ELEMENTS] if len(shape) >= 2 else piece[:_DIGEST_ROW_ELEMENTS]
                    h.update(json.dumps([name, str(piece.get_dtype()), list(shape)]).encode())
                    h.update(row.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        except SafetensorError as e:
            raise _unreadable_weights(ref, e) from e
    return h.hexdigest()[:16]


def _unreadable_weights(ref: ModelRef, error: Exception) -> BadInputError:
    return BadInputError(
        f"cannot load model '{ref.id}': its weights are unreadable ({str(error).splitlines()[0]})",
        hint="the weight files are truncated or corrupt: download or copy them again",
    )


def check_base(recorded: BaseIdentity, ref: ModelRef, *, what: str, path: str | None, force: bool) -> None:
    """Refuse to apply an artifact made on other weights than `ref`'s: its `base_model` entry (`recorded`) holds
    the weights digest it was made on, compared by content, never by path (the same checkpoint in another folder
    agrees). `--force-base` (`force`) applies it anyway, with a warning: a deliberate transfer. Where either
    digest is unknown (a file from before digests, a hub model not cached here) nothing can be compared."""
    made_on, here = recorded.weights_digest, weights_digest(ref)
    if made_on is None or here is None or made_on == here:
        return
    message = f"{what} was made on other weights ({recorded.id}) than model '{ref.id}'"
    if force:
        log.warning("--force-base: %s", message)
        return
    raise IncompatibleArtifactError(
        message, path=path, hint="pass the model it was made on, or --force-base to apply it to this one anyway"
    )


def _local_checkpoint(ref: ModelRef) -> Path | None:
    """The directory holding the model's weight files: `ref.path` itself, or its hub snapshot if already cached."""
    if Path(ref.path).is_dir():
        return Path(ref.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.path, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
    except (OSError, ValueError) as e:  # not cached (LocalEntryNotFoundError), a bad id: no digest, no download
        log.debug("no local checkpoint of %s: %s", ref.id, e)
        return None


def linear_shapes_from_config(
    ref: ModelRef, *, trust_remote_code: bool = False, head: str = "causal-lm"
) -> dict[str, tuple[int, int]]:
    """(m, n) of every linear layer, from config.json alone: the model is built on the meta device."""
    model = meta_model(ref, trust_remote_code=trust_remote_code, head=head)
    return {name: linear_shape(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """A sequence classifier's head parameters under their state_dict names (empty for a causal LM)."""
    if not is_classifier(model):
        return {}
    return {name: p for name, p in model.named_parameters() if name.split(".")[0] in HEAD_MODULES}


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's tensors as float32 CPU copies (what an update or factors file carries)."""
    return {name: p.detach().float().cpu().clone() for name, p in head_parameters(model).items()}


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


@dataclass(frozen=True)
class HeadSpec:
    """A sequence classifier's head as every artifact records it (metadata keys `architecture`, `labels`, `head`):
    the class that rebuilds the model, its labels (one label: regression) and its tensors' state_dict names. A
    causal LM has none: `from_model`/`from_meta` give None, which is how a stage asks "is this a classifier"."""

    architecture: str
    labels: tuple[str, ...]
    tensors: tuple[str, ...]

    @classmethod
    def from_model(cls, model: nn.Module, labels: Sequence[str] | None) -> HeadSpec | None:
        if not is_classifier(model):
            return None
        return cls(type(model).__name__, tuple(labels or ()), tuple(sorted(head_parameters(model))))

    @classmethod
    def from_meta(cls, meta: ArtifactMeta) -> HeadSpec | None:
        if meta.labels is None:
            return None
        return cls(meta.architecture, meta.labels, meta.head)


def head_meta(spec: HeadSpec | None) -> dict:
    """The metadata fields of `spec` (ArtifactMeta's architecture, labels, head): none for a causal LM."""
    return {"architecture": spec.architecture, "labels": spec.labels, "head": spec.tensors} if spec else {}


def auto_head(spec: HeadSpec | None) -> str:
    """The `head` argument of `load_model` (and the meta-device builders) for a run with or without `spec`."""
    return "sequence-classification" if spec is not None else "causal-lm"


def require_classifier(ref: ModelRef, *, trust_remote_code: bool = False) -> None:
    """Refuse a causal LM where a sequence classifier is needed, naming the Auto class."""
    arch = architectures(ref, trust_remote_code=trust_remote_code)
    if any(a.endswith("ForCausalLM") for a in arch):
        raise BadInputError(
            f"--format classification needs a sequence-classification model; '{ref.id}' is {', '.join(arch)}",
            hint="use an encoder (e.g. --model minilm-l6) loaded with AutoModelForSequenceClassification, "
            "or text / prompt-response data",
        )
