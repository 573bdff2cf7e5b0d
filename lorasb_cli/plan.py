"""Memory plans: the bytes each stage needs, from the model's config alone (docs/design.md §4, §5).

The model is built on the meta device (shapes and dtypes, no weights read). Its activations come from one
forward pass on meta tensors at batch × length: every tensor autograd saves for backward, plus (estimate) the
target inputs the gradient hooks hold, each storage counted once, parameters and buffers excluded. Attention is
traced as the fused SDPA kernels run it (flash / memory-efficient on GPU, flash on CPU: they keep q, k, v, the
output and a float32 log-sum-exp per row; the math fallback would also keep the B·H·T² probabilities).

What the stages hold at their peak (the start of backward, or the largest shard of a merge):

- estimate: weights + accumulators (Σ m·n of the targets × 4 bytes float32, 2 bfloat16) + activations + the
  loss: logits, their gradient (both in the model dtype) and float32 chunks of `loss._WeightedCrossEntropy`;
- train (LoRA-SB at rank r): weights + B, A (float32 buffers, r·(m+n) per target) + R with its gradient and two
  AdamW states (4 × r² float32) + activations + HF's causal-LM loss: logits, and in float32 the log-softmax it
  keeps plus the two [N, V] gradients of its backward;
- merge: the adapter's factors (float32), the merged tensors of the largest shard (held until that shard is
  saved; the base is read one memory-mapped tensor at a time), and the largest target weight being merged with
  its float32 copy and B·R·A.

Per device (`--world-size N`, `--strategy`, `--quantize`; docs/design.md §5): under ddp every process holds all of
the above (the batch is per process). Under fsdp the base is sharded 1/N per device, and gathered whole, for compute,
one unit at a time: a decoder layer (the model's `_no_split_modules`), and the root unit (embeddings, final norm,
output head), which FSDP2 keeps gathered from forward to backward; estimate's accumulators live on one owner rank
per target (balanced by size), each target's gradient reduced to its owner; R and its AdamW states are sharded, B
and A (buffers) are not. Activations and the loss are per device under both. `--quantize` stores the linear layers
of `models.quantized_modules` in the bytes of `quantization.quantized_linear_bytes` (nf4/fp4 0.5625 bytes a weight,
int8 1 byte and a scale per row), and each quantized matmul holds a dense copy of its weight in the compute dtype
while it runs (the largest one counted). merge runs in one process on the host whatever the job's layout.

Measured against these on SmolLM2 (benchmarks/estimate.py) and on a Mistral-7B-shaped model (benchmarks/gpu.py).
"""

from __future__ import annotations

import heapq
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import held_inputs, loss, models, quantization
from .configs import ACCUMULATE_ON, QUANTIZE, STRATEGIES
from .errors import BadInputError
from .options import MAX_LENGTH

log = logging.getLogger("lorasb")

GIB = 2**30
ACCUMULATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------- the meta model


def meta_model(
    ref: models.ModelRef, *, dtype: torch.dtype, head: str = "causal-lm", trust_remote_code: bool = False
) -> nn.Module:
    """The model of `ref` built from its config.json on the meta device, in `dtype`: shapes, no weights."""
    return models.meta_model(ref, head=head, trust_remote_code=trust_remote_code).to(dtype)


class _FusedAttention(torch.autograd.Function):
    """Shapes and saved tensors of a fused SDPA kernel: q [B, H, T, D], k, v [B, Hkv, T, D] → out; keeps q, k,
    v, out and a float32 log-sum-exp [B, H, T]. The output is laid out [B, T, H, D] as the kernels lay it out, so
    the model's transpose back is a view and o_proj reads the saved output."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, t, _ = q.shape
        out = q.new_empty(b, t, h, v.shape[-1]).transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, q.new_empty(b, h, t, dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(module, query, key, value, attention_mask, **kwargs):
    return _FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def activation_bytes(
    model: nn.Module, batch_size: int, length: int, *, targets: list[str] | None = None, mode: str = "estimate"
) -> tuple[int, int]:
    """(activation bytes, logits entries) of one forward of the meta `model` at batch_size × length.

    Activations: each storage that autograd saves for backward, and in `mode` "estimate" each target input that
    estimate's hooks hold (`held_inputs.held_input`), counted once; parameters and buffers are weights, not activations.
    "estimate": no weight requires grad, the embeddings' output does (as `estimate.sum_gradients` runs it);
    "train": whatever requires grad in `model` (a LoRA-SB model: the Rs).
    """
    from transformers import AttentionInterface

    AttentionInterface.register("lorasb_plan", _fused_attention)
    weights = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, torch.Tensor] = {}  # holding them also keeps their keys unique while the trace runs

    def keep(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.device.type == "meta" and _storage_key(t) not in weights:
            kept.setdefault(_storage_key(t), t)
        return t

    def hold(_module, inputs, _output) -> None:
        if held_inputs.recomputable(inputs[0]) is None:
            keep(inputs[0])

    handles = []
    if mode == "estimate":
        model.requires_grad_(False)
        embeddings = model.get_input_embeddings()
        handles.append(embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
        named = dict(model.named_modules())
        handles += [named[name].register_forward_hook(hold) for name in targets or []]
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = "lorasb_plan"
    try:
        # No sample is longer than the model's positions (longer ones would fail in the model itself).
        length = min(length, getattr(config, "max_position_embeddings", None) or length)
        ids = torch.zeros(batch_size, length, dtype=torch.long, device="meta")
        # A causal LM's KV cache would keep k and v past the forward; training and estimate run without one.
        kwargs = {"use_cache": False} if hasattr(config, "use_cache") else {}
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logits = model(input_ids=ids, **kwargs).logits
    finally:
        config._attn_implementation = previous
        for handle in handles:
            handle.remove()
    return sum(t.untyped_storage().nbytes() for t in kept.values()), logits.numel()


# --------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Item:
    """One thing a stage holds: `what`, its size in bytes, and `where` ("cpu" or the device, e.g. "cuda:0")."""

    what: str
    bytes: int
    where: str


@dataclass(frozen=True)
class StagePlan:
    stage: str
    items: tuple[Item, ...]
    note: str = ""

    def need(self) -> dict[str, int]:
        """Bytes needed at once on each place."""
        places: dict[str, int] = {}
        for item in self.items:
            places[item.where] = places.get(item.where, 0) + item.bytes
        return places

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)


@dataclass(frozen=True)
class ModelFacts:
    """What the plans are computed from: the meta model's sizes at one batch, length, rank and dtype."""

    model: str
    dtype: str
    parameters: int
    weight_bytes: int
    targets: dict[str, tuple[int, int]]
    batch_size: int
    max_length: int
    rank: int
    estimate_activations: int
    train_activations: int
    logits_entries: int
    largest_shard_bytes: int
    shard_source: str
    itemsize: int = field(default=4)
    # estimate --report-ranks sums the sample's two halves apart: two accumulators per target until they are added.
    accumulator_sets: int = 1
    quantize: str | None = None  # --quantize: the bytes above are those of the quantized base
    root_weight_bytes: int = 0  # weights outside the decoder layers (embeddings, final norm, output head)
    largest_layer_bytes: int = 0  # the largest decoder layer's weights: what fsdp gathers at a time
    dequantized_bytes: int = 0  # the largest quantized weight's dense copy in the compute dtype (0: not quantized)

    @property
    def target_entries(self) -> int:
        """Σ m·n over the target weights."""
        return sum(m * n for m, n in self.targets.values())


def accumulator_bytes(shapes: dict[str, tuple[int, int]], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of estimate's accumulators: one [m, n] tensor of `dtype` per target."""
    return sum(m * n for m, n in shapes.values()) * dtype.itemsize


def model_facts(
    ref: models.ModelRef,
    *,
    targets: str = "all-linear",
    batch_size: int = 8,
    max_length: int = 512,
    rank: int = 32,
    dtype: torch.dtype = torch.bfloat16,
    quantize: str | None = None,
    head: str = "causal-lm",
    train: bool = True,
    trust_remote_code: bool = False,
) -> ModelFacts:
    """Sizes of the model at `dtype` (its linear layers quantized as `quantize`), its targets, and the activations
    of estimate and (`train`) of a LoRA-SB train step at batch_size × max_length: meta forwards, no weights read.

    The trace takes seconds (4.5 s of SmolLM2's start) and depends only on the config and the arguments, so it is
    kept under `$LORASB_HOME/plans/`, keyed by the config's content, the arguments, the torch and transformers
    versions and this trace's code; a model's own code (`trust_remote_code`) is traced every time."""
    arguments = {
        "targets": targets,
        "batch_size": batch_size,
        "max_length": max_length,
        "rank": rank,
        "dtype": str(dtype),
        "quantize": quantize,
        "head": head,
        "train": train,
    }
    cache = None if trust_remote_code else _trace_cache_path(ref, arguments)
    traced = _read_trace(cache)
    if traced is None:
        traced = _trace(ref, targets, batch_size, max_length, rank, dtype, quantize, head, train, trust_remote_code)
        _write_trace(cache, traced)
    shard, source = _largest_shard(ref, traced["weight_bytes"])
    return ModelFacts(
        model=ref.id,
        dtype=str(dtype).removeprefix("torch."),
        targets={name: tuple(shape) for name, shape in traced.pop("targets").items()},
        batch_size=batch_size,
        max_length=max_length,
        rank=rank,
        largest_shard_bytes=shard,
        shard_source=source,
        itemsize=dtype.itemsize,
        quantize=quantize,
        **traced,
    )


def _trace(ref, targets, batch_size, max_length, rank, dtype, quantize, head, train, trust_remote_code) -> dict:
    """The meta forwards behind `model_facts`: sizes and activation bytes, as JSON-ready values."""
    from . import adapter

    model = meta_model(ref, dtype=dtype, head=head, trust_remote_code=trust_remote_code)
    modules = models.resolve_targets(model, targets)
    shapes = models.target_shapes(model, modules)
    loaded = loaded_bytes(model, quantize)
    weight_bytes = sum(loaded.values())
    layers = [_units_bytes(unit, loaded) for unit in decoder_layers(model)]
    quantized = models.target_shapes(model, models.quantized_modules(model)) if quantize else {}
    dense_itemsize = 2 if quantize == "int8" else dtype.itemsize  # bitsandbytes' int8 matmuls run in float16
    parameters = sum(p.numel() for p in model.parameters())
    estimate_activations, logits = activation_bytes(model, batch_size, max_length, targets=modules)
    train_activations = 0
    if train:
        factors = {}
        for name, (m, n) in shapes.items():
            r = min(rank, m, n)
            factors[name] = tuple(torch.empty(shape, device="meta") for shape in ((m, r), (r, r), (r, n)))
        adapter.inject(model, factors)
        model.train()
        train_activations, _ = activation_bytes(model, batch_size, max_length, mode="train")
    return {
        "parameters": parameters,
        "weight_bytes": weight_bytes,
        "targets": shapes,
        "estimate_activations": estimate_activations,
        "train_activations": train_activations,
        "logits_entries": logits,
        "root_weight_bytes": weight_bytes - sum(layers),
        "largest_layer_bytes": max(layers, default=0),
        "dequantized_bytes": max((m * n for m, n in quantized.values()), default=0) * dense_itemsize,
    }


def _trace_cache_path(ref: models.ModelRef, arguments: dict) -> Path:
    """`$LORASB_HOME/plans/<sha256>.json` for this config (its content, not its path) and these arguments."""
    import hashlib
    import json

    import transformers

    from .bundled import cache_home

    config = models.model_config(ref).to_dict()
    config.pop("_name_or_path", None)
    here = Path(__file__).resolve().parent
    code = hashlib.sha256(
        b"".join((here / name).read_bytes() for name in ("plan.py", "adapter.py", "quantization.py"))
    ).hexdigest()
    key = {
        "config": config,
        "arguments": arguments,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "code": code,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_home() / "plans" / f"{digest[:32]}.json"


def _read_trace(path: Path | None) -> dict | None:
    import json

    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):  # a damaged cache entry is traced again and rewritten
        return None


def _write_trace(path: Path | None, traced: dict) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) only costs the next run the trace."""
    import json

    from .files import atomic_path

    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(traced))
    except (OSError, BadInputError):  # a storage error: see the docstring
        log.debug("could not cache the plan's trace at %s", path, exc_info=True)


def loaded_bytes(model: nn.Module, quantize: str | None) -> dict[int, int]:
    """Bytes of each weight storage of the meta `model` (parameters and buffers, a tied one once) as a stage loads
    it: the weights of `models.quantized_modules` in their `quantize` storage, everything else as it is."""
    sizes = {_storage_key(t): t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers())}
    if quantize is not None:
        for name in models.quantized_modules(model):
            module = model.get_submodule(name)
            sizes[_storage_key(module.weight)] = quantization.quantized_linear_bytes(
                quantize, *models.linear_shape(module)
            )
    return sizes


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The units fsdp shards and gathers one at a time: the outermost modules of the classes the model names in
    `_no_split_modules` (transformers' own unit of placement, e.g. LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            units.append(module)
            inside |= {id(m) for m in module.modules()}
    return units


def _units_bytes(unit: nn.Module, loaded: dict[int, int]) -> int:
    keys = {_storage_key(t) for t in (*unit.parameters(), *unit.buffers())}
    return sum(loaded[k] for k in keys)


def _largest_shard(ref: models.ModelRef, weight_bytes: int) -> tuple[int, str]:
    """The largest safetensors file of a local checkpoint (its size on disk), else the whole checkpoint."""
    path = Path(ref.path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        return max(f.stat().st_size for f in files), f"largest of {len(files)} local shard file(s)"
    return weight_bytes, "shard layout unknown: the whole checkpoint assumed"


@dataclass(frozen=True)
class Layout:
    """How the processes of a job share the model (docs/design.md §5): `world_size` processes, `strategy` ddp (each holds
    the whole base) or fsdp (the base sharded across them). The plans are per process, i.e. per device."""

    world_size: int = 1
    strategy: str = "ddp"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise BadInputError(f"unknown --strategy '{self.strategy}'", hint="use ddp or fsdp")

    @property
    def sharded(self) -> int:
        """The number of shards of the base and of what is sharded with it (1: none)."""
        return self.world_size if self.strategy == "fsdp" else 1

    def describe(self) -> str:
        return f"{self.world_size} × {self.strategy}"


def _shard(total: int, shards: int) -> int:
    return -(-total // shards)


def _weight_items(facts: ModelFacts, device: str, layout: Layout) -> tuple[Item, ...]:
    """The base's weights on one device: whole (ddp), or a 1/N shard plus what fsdp gathers at a time; and the dense
    copy a quantized matmul makes of its weight."""
    what = f"weights ({facts.dtype}{f', {facts.quantize} linear layers' if facts.quantize else ''})"
    n = layout.sharded
    if n == 1:
        items = [Item(what, facts.weight_bytes, device)]
    else:
        gathered = facts.root_weight_bytes + facts.largest_layer_bytes
        items = [
            Item(f"{what}, a 1/{n} shard", _shard(facts.weight_bytes, n), device),
            Item(
                "gathered beyond the shard: the root unit (embeddings, norm, head) and one decoder layer",
                gathered - gathered // n,
                device,
            ),
        ]
    if facts.dequantized_bytes:
        items.append(Item("the largest quantized weight, dequantized for its matmul", facts.dequantized_bytes, device))
    return tuple(items)


def owner_loads(sizes: list[int], owners: int) -> list[int]:
    """Bytes each of `owners` ranks holds when every item of `sizes` goes to one owner, balanced by size: largest
    first, each to the least loaded rank (within 4/3 of the best split)."""
    loads = [(0, rank) for rank in range(owners)]
    heapq.heapify(loads)
    for size in sorted(sizes, reverse=True):
        load, rank = heapq.heappop(loads)
        heapq.heappush(loads, (load + size, rank))
    return [load for load, _ in sorted(loads, key=lambda item: item[1])]


def estimate_plan(
    facts: ModelFacts,
    *,
    device: str = "cpu",
    accumulate_on: str = "cpu",
    accumulate_dtype: torch.dtype = torch.float32,
    layout: Layout = Layout(),
) -> StagePlan:
    """estimate's peak on one device: weights, accumulators, activations and the loss at batch × length (see the
    module doc)."""
    accumulate_where = device if accumulate_on == "device" else "cpu"
    logits = facts.logits_entries * facts.itemsize
    chunks = min(2 * loss.LOSS_CHUNK_BYTES, facts.logits_entries * 4)  # estimate's loss: two float32 chunks
    halves = ", 2 halves" if facts.accumulator_sets == 2 else ""
    n = layout.sharded
    owned = f", the targets one rank of {n} owns" if n > 1 else ""
    accumulators = (
        f"accumulators ({str(accumulate_dtype).removeprefix('torch.')}, {len(facts.targets)} targets{halves}{owned})"
    )
    sizes = [m * k * accumulate_dtype.itemsize for m, k in facts.targets.values()]
    in_flight = []
    if n > 1:
        largest = max((m * k for m, k in facts.targets.values()), default=0)
        in_flight = [Item("the largest target's gradient on its way to its owner rank (float32)", 4 * largest, device)]
    items = (
        *_weight_items(facts, device, layout),
        Item(accumulators, facts.accumulator_sets * max(owner_loads(sizes, n)), accumulate_where),
        *in_flight,
        Item("activations (saved for backward, held target inputs)", facts.estimate_activations, device),
        Item("loss: logits, their gradient, float32 chunks", 2 * logits + chunks, device),
    )
    return StagePlan("estimate", items, f"batch {facts.batch_size} × {facts.max_length} tokens")


def train_plan(facts: ModelFacts, *, device: str = "cpu", layout: Layout = Layout()) -> StagePlan:
    """A LoRA-SB training step's peak on one device at rank `facts.rank` (see the module doc)."""
    ranks = {name: min(facts.rank, m, n) for name, (m, n) in facts.targets.items()}
    factors = sum(r * (m + n) for r, (m, n) in zip(ranks.values(), facts.targets.values())) * 4
    trained = sum(r * r for r in ranks.values()) * 4
    shards = layout.sharded
    items = (
        *_weight_items(facts, device, layout),
        Item("B, A (float32)", factors, device),
        Item(
            "R, its gradient, AdamW's two states (float32" + (f", a 1/{shards} shard)" if shards > 1 else ")"),
            _shard(4 * trained, shards),
            device,
        ),
        Item("activations (saved for backward)", facts.train_activations, device),
        Item(
            "loss: logits; float32 log-softmax and two gradients", facts.logits_entries * (facts.itemsize + 12), device
        ),
    )
    return StagePlan("train", items, f"LoRA-SB r={facts.rank}, batch {facts.batch_size} × {facts.max_length}")


def merge_plan(facts: ModelFacts) -> StagePlan:
    """merge's peak: streaming the base one shard at a time (see the module doc)."""
    ranks = {name: min(facts.rank, m, n) for name, (m, n) in facts.targets.items()}
    factors = sum(r * (m + n) + r * r for r, (m, n) in zip(ranks.values(), facts.targets.values())) * 4
    largest = max((m * n for m, n in facts.targets.values()), default=0)
    items = (
        Item("adapter factors (float32)", factors, "cpu"),
        Item("the merged tensors of the largest shard, until it is saved", facts.largest_shard_bytes, "cpu"),
        Item("the largest target weight read, its float32 copy and B·R·A", largest * (facts.itemsize + 8), "cpu"),
    )
    return StagePlan("merge", items, facts.shard_source)


@dataclass(frozen=True)
class Plan:
    """Each stage's plan, and the bytes `free` on each place when it was made (empty: not looked up)."""

    facts: ModelFacts
    stages: dict[str, StagePlan]
    free: dict[str, int] = field(default_factory=dict)
    layout: Layout = Layout()

    def per_device(self) -> dict[str, dict[str, int]]:
        """{stage: {"gpu": bytes, "host": bytes}} that each device of the job needs: on the accelerator, and in the
        host memory its process uses (merge runs in one process on the host)."""
        return {
            name: {
                "gpu": sum(b for where, b in stage.need().items() if where != "cpu"),
                "host": stage.need().get("cpu", 0),
            }
            for name, stage in self.stages.items()
        }

    def fits(self, stage: str) -> bool | None:
        """Whether `stage` fits in what was free (None when a place it needs was not looked up)."""
        if not set(self.stages[stage].need()) <= set(self.free):
            return None
        return not shortfall(self.stages[stage], self.free)

    def _stage_json(self, name: str) -> dict:
        stage = self.stages[name]
        return {
            "need_bytes": stage.need(),
            "total_bytes": stage.total,
            "fits": self.fits(name),
            "note": stage.note,
            "items": [asdict(item) for item in stage.items],
        }

    def to_json(self) -> dict:
        facts = asdict(self.facts)
        facts["targets"] = len(self.facts.targets)
        facts["target_entries"] = self.facts.target_entries
        return {
            "per_device_bytes": self.per_device(),
            "world_size": self.layout.world_size,
            "strategy": self.layout.strategy,
            "quantize": self.facts.quantize,
            "model": facts,
            "free_bytes": self.free,
            "stages": {name: self._stage_json(name) for name in self.stages},
        }


def plan_stages(
    facts: ModelFacts,
    *,
    device: str = "cpu",
    accumulate_on: str = "cpu",
    accumulate_dtype: torch.dtype = torch.float32,
    free: dict[str, int] | None = None,
    layout: Layout = Layout(),
) -> Plan:
    """The plans of estimate (accumulators on `accumulate_on`: "cpu" or "device"), train and merge, per device of
    `layout`."""
    return Plan(
        facts,
        {
            "estimate": estimate_plan(
                facts, device=device, accumulate_on=accumulate_on, accumulate_dtype=accumulate_dtype, layout=layout
            ),
            "train": train_plan(facts, device=device, layout=layout),
            "merge": merge_plan(facts),
        },
        free or {},
        layout,
    )


def plan_model(
    model: str,
    *,
    targets: str = "all-linear",
    batch_size: int = 8,
    max_length: int | None = None,
    rank: int = 32,
    dtype: str = "auto",
    device: str = "auto",
    accumulate_on: str = "auto",
    accumulate_dtype: str = "float32",
    quantize: str | None = None,
    layout: Layout = Layout(),
    head: str = "causal-lm",
    trust_remote_code: bool = False,
) -> Plan:
    """`lorasb estimate --dry-run`: the plan of every stage for `--model` (alias, hub id, or a local directory —
    config.json alone is enough) per device of `layout`, with the options resolved as the stages resolve them and
    what is free now."""
    if quantize is not None and quantize not in QUANTIZE:
        raise BadInputError(f"unknown --quantize '{quantize}'", hint=f"use {', '.join(QUANTIZE)}")
    ref = models.resolve_model(model)
    resolved_device = _planned_device(device)
    facts = model_facts(
        ref,
        targets=targets,
        batch_size=batch_size,
        max_length=models.fit_max_length(max_length, MAX_LENGTH, ref, trust_remote_code=trust_remote_code),
        rank=rank,
        dtype=models.resolve_dtype(dtype, resolved_device),
        quantize=quantize,
        head=head,
        trust_remote_code=trust_remote_code,
    )
    where = place(resolved_device)
    dtype_ = accumulate_dtype_of(accumulate_dtype)
    free = available_memory({"cpu", where})
    on = resolve_accumulate_on(
        facts, device=where, accumulate_on=accumulate_on, accumulate_dtype=dtype_, free=free, layout=layout
    )
    return plan_stages(facts, device=where, accumulate_on=on, accumulate_dtype=dtype_, free=free, layout=layout)


def _planned_device(name: str) -> torch.device:
    """The device a plan is made for: `--device` as the stages resolve it, except that a plan for an accelerator
    this machine lacks is allowed (`--dry-run --device cuda` on a laptop plans the GPU job)."""
    if name == "auto":
        return models.resolve_device(name)
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise BadInputError(f"unknown --device '{name}'", hint="use auto, cpu, cuda or cuda:N") from e


def accumulate_dtype_of(name: str) -> torch.dtype:
    """`--accumulate-dtype` float32 or bfloat16 as a torch dtype, or a one-line BadInputError."""
    if name not in ACCUMULATE_DTYPES:
        raise BadInputError(f"unknown --accumulate-dtype '{name}'", hint="use float32 or bfloat16")
    return ACCUMULATE_DTYPES[name]


def accumulate_on_of(name: str) -> str:
    """`--accumulate-on` checked: auto, cpu or device, or a one-line BadInputError."""
    if name not in ACCUMULATE_ON:
        raise BadInputError(f"unknown --accumulate-on '{name}'", hint="use auto, cpu or device")
    return name


# ------------------------------------------------------------------------------------------ what is available


def place(device: torch.device) -> str:
    """The name plans use for where `device`'s memory is: "cpu" or e.g. "cuda:0"."""
    if device.type == "cpu":
        return "cpu"
    if device.index is not None:
        return f"{device.type}:{device.index}"
    # A plan for a GPU can be made on a machine without one (--dry-run --device cuda): call it device 0.
    return f"{device.type}:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"


def available_memory(places: set[str]) -> dict[str, int]:
    """Bytes free now on each place: RAM (MemAvailable) for "cpu", `torch.cuda.mem_get_info` for "cuda:N";
    a place this machine lacks is left out (nothing is checked there)."""
    free = {}
    for where in places:
        if where == "cpu":
            free[where] = _available_ram()
        elif where.startswith("cuda") and torch.cuda.is_available():
            free[where] = torch.cuda.mem_get_info(torch.device(where))[0]
    return free


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def shortfall(stage: StagePlan, free: dict[str, int]) -> dict[str, tuple[int, int]]:
    """{place: (needed, free)} of each place where `stage` needs more than is free."""
    need = stage.need()
    return {where: (b, free[where]) for where, b in need.items() if where in free and b > free[where]}


def resolve_accumulate_on(
    facts: ModelFacts,
    *,
    device: str,
    accumulate_on: str,
    accumulate_dtype: torch.dtype,
    free: dict[str, int],
    layout: Layout = Layout(),
) -> str:
    """`--accumulate-on` as "cpu" or "device": "auto" is "device" on an accelerator when all of estimate fits
    there (no copy to the host per module and batch), else "cpu"."""
    if accumulate_on_of(accumulate_on) != "auto":
        return accumulate_on
    on_device = estimate_plan(
        facts, device=device, accumulate_on="device", accumulate_dtype=accumulate_dtype, layout=layout
    )
    return "device" if device != "cpu" and not shortfall(on_device, free) else "cpu"


def choose_accumulation(
    facts: ModelFacts,
    *,
    device: str,
    accumulate_on: str,
    accumulate_dtype: torch.dtype,
    free: dict[str, int] | None = None,
) -> str:
    """Resolve `--accumulate-on` and check that estimate fits in `free` (default: what is free now), before
    any weight is loaded. Raises BadInputError when it does not, naming the options that would fit."""
    free = available_memory({"cpu", device}) if free is None else free
    accumulate_on = resolve_accumulate_on(
        facts, device=device, accumulate_on=accumulate_on, accumulate_dtype=accumulate_dtype, free=free
    )
    stage = estimate_plan(facts, device=device, accumulate_on=accumulate_on, accumulate_dtype=accumulate_dtype)
    short = shortfall(stage, free)
    if not short:
        return accumulate_on
    missing = "; ".join(
        f"{need / GIB:.1f} GiB on {where} but {have / GIB:.1f} GiB is free" for where, (need, have) in short.items()
    )
    fits = []
    for on in ("cpu", "device") if device != "cpu" else ("cpu",):
        for name, dtype in ACCUMULATE_DTYPES.items():
            option = estimate_plan(facts, device=device, accumulate_on=on, accumulate_dtype=dtype)
            if (on, dtype) != (accumulate_on, accumulate_dtype) and not shortfall(option, free):
                fits.append(f"--accumulate-on {on} --accumulate-dtype {name}")
    hint = (
        ("these fit: " + ", or ".join(fits))
        if fits
        else (
            "no accumulator placement fits: lower --batch-size or --max-length, use --dtype bfloat16, or a machine "
            "with more memory (lorasb estimate --dry-run shows the plan)"
        )
    )
    accumulators = next(i for i in stage.items if i.what.startswith("accumulators"))
    raise BadInputError(
        f"estimate needs {missing} (accumulators {accumulators.bytes / GIB:.1f} GiB on {accumulators.where}, "
        f"weights {facts.weight_bytes / GIB:.1f} GiB)",
        hint=hint,
    )
