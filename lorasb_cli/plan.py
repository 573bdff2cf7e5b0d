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

Measured against these on SmolLM2 (benchmarks/estimate.py) and on a Mistral-7B-shaped model (benchmarks/gpu.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import models
from .configs import ACCUMULATE_ON
from .errors import BadInputError
from .options import MAX_LENGTH

GIB = 2**30
ACCUMULATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# estimate's loss (loss._WeightedCrossEntropy) works in float32 chunks of rows of about this many bytes;
# two live at once.
LOSS_CHUNK_BYTES = 32 * 2**20


# ----------------------------------------------------------------------------------- what estimate's hooks hold


_SAVED = ("_saved_self", "_saved_other")
_HALF = (torch.bfloat16, torch.float16)
_Part = tuple[Callable[[], torch.Tensor], torch.dtype, torch.Size]


def _rebuild(fn, out_dtype: torch.dtype | None, depth: int = 2) -> _Part | None:
    """(call, dtype, shape) that recomputes the output of the product node `fn` (MulBackward0) from tensors autograd
    keeps for its backward anyway, or None: SwiGLU's act(gate)·up before down_proj; RMSNorm's weight·(x·rsqrt)
    before q/k/v and gate/up, whose inner product is saved and, in bf16/fp16 models, cast (ToCopyBackward0).

    The same multiplications of the same tensors: bit for bit the forward's result. A cast's target dtype is not in
    the graph; it is taken only where it is the one possible: `out_dtype` (the product's, when known) is bf16 or
    fp16 and the other factor has it — a cast to any other float would have promoted the product.
    """
    if fn is None or type(fn).__name__ != "MulBackward0":
        return None
    saved = [getattr(fn, attr, None) for attr in _SAVED]
    parts: list[_Part] = []
    for i, (source, _) in enumerate(fn.next_functions):
        if isinstance(saved[i], torch.Tensor):
            parts.append(((lambda attr=_SAVED[i]: getattr(fn, attr)), saved[i].dtype, saved[i].shape))
            continue
        if depth == 0 or source is None:
            return None
        other = saved[1 - i]
        if type(source).__name__ == "ToCopyBackward0":
            if out_dtype not in _HALF or not isinstance(other, torch.Tensor) or other.dtype != out_dtype:
                return None
            inner = _rebuild(source.next_functions[0][0], None, depth - 1)
            if inner is None:
                return None
            parts.append(((lambda call=inner[0]: call().to(out_dtype)), out_dtype, inner[2]))
        else:
            inner = _rebuild(source, None, depth - 1)
            if inner is None:
                return None
            parts.append(inner)
    (a, a_dtype, a_shape), (b, b_dtype, b_shape) = parts
    if not a_shape or not b_shape:  # a 0-dim factor promotes differently; not a pattern seen here
        return None
    dtype, shape = torch.promote_types(a_dtype, b_dtype), torch.broadcast_shapes(a_shape, b_shape)
    return (lambda: torch.mul(a(), b())), dtype, shape


def recomputable(x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """A call that rebuilds x bit for bit from what autograd saves anyway (see `_rebuild`), or None."""
    part = _rebuild(x.grad_fn, x.dtype)
    if part is None or part[1] != x.dtype or part[2] != x.shape:
        return None
    return part[0]


def held_input(x: torch.Tensor) -> tuple[Callable[[], torch.Tensor], bool]:
    """What estimate keeps of a target's input x [.., n] until its output's gradient arrives: (a call that gives
    x, whether that call rebuilds x).

    A recomputable x costs nothing until then (what it is rebuilt from is alive anyway); any other x is held as
    is — q/k/v (and gate/up) read one tensor, so they hold one storage, and o_proj's input is the attention
    output the fused kernels already keep.
    """
    recipe = recomputable(x)
    if recipe is not None:

        def rebuilt() -> torch.Tensor:
            with torch.no_grad():
                return recipe()

        return rebuilt, True
    held = x.detach()
    return (lambda: held), False


# ------------------------------------------------------------------------------------------- the meta model


def meta_model(
    ref: models.ModelRef, *, dtype: torch.dtype, head: str = "causal-lm", trust_remote_code: bool = False
) -> nn.Module:
    """The model of `ref` built from its config.json on the meta device, in `dtype`: shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if head == "sequence-classification" else AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInputError(
            f"cannot read the config of model '{ref.id}': {str(e).splitlines()[0]}",
            hint="pass a local directory with its config.json (no weights needed), an alias or a hub id",
        ) from e
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return model.to(dtype)


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
    estimate's hooks hold (`held_input`), counted once; parameters and buffers are weights, not activations.
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
        if recomputable(inputs[0]) is None:
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
    head: str = "causal-lm",
    train: bool = True,
    trust_remote_code: bool = False,
) -> ModelFacts:
    """Sizes of the model at `dtype`, its targets, and the activations of estimate and (`train`) of a LoRA-SB
    train step at batch_size × max_length: meta forwards, no weights read."""
    from . import adapter

    model = meta_model(ref, dtype=dtype, head=head, trust_remote_code=trust_remote_code)
    modules = models.resolve_targets(model, targets)
    shapes = models.target_shapes(model, modules)
    unique = {_storage_key(t): t for t in (*model.parameters(), *model.buffers())}  # tied weights once
    weight_bytes = sum(t.untyped_storage().nbytes() for t in unique.values())
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
    shard, source = _largest_shard(ref, weight_bytes)
    return ModelFacts(
        model=ref.id,
        dtype=str(dtype).removeprefix("torch."),
        parameters=parameters,
        weight_bytes=weight_bytes,
        targets=shapes,
        batch_size=batch_size,
        max_length=max_length,
        rank=rank,
        estimate_activations=estimate_activations,
        train_activations=train_activations,
        logits_entries=logits,
        largest_shard_bytes=shard,
        shard_source=source,
        itemsize=dtype.itemsize,
    )


def _largest_shard(ref: models.ModelRef, weight_bytes: int) -> tuple[int, str]:
    """The largest safetensors file of a local checkpoint (its size on disk), else the whole checkpoint."""
    path = Path(ref.path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        return max(f.stat().st_size for f in files), f"largest of {len(files)} local shard file(s)"
    return weight_bytes, "shard layout unknown: the whole checkpoint assumed"


def estimate_plan(
    facts: ModelFacts, *, device: str = "cpu", accumulate_on: str = "cpu", accumulate_dtype: torch.dtype = torch.float32
) -> StagePlan:
    """estimate's peak: weights, accumulators, activations and the loss at batch × length (see the module doc)."""
    accumulate_where = device if accumulate_on == "device" else "cpu"
    logits = facts.logits_entries * facts.itemsize
    chunks = min(2 * LOSS_CHUNK_BYTES, facts.logits_entries * 4)
    halves = ", 2 halves" if facts.accumulator_sets == 2 else ""
    accumulators = (
        f"accumulators ({str(accumulate_dtype).removeprefix('torch.')}, {len(facts.targets)} targets{halves})"
    )
    items = (
        Item(f"weights ({facts.dtype})", facts.weight_bytes, device),
        Item(
            accumulators, facts.accumulator_sets * accumulator_bytes(facts.targets, accumulate_dtype), accumulate_where
        ),
        Item("activations (saved for backward, held target inputs)", facts.estimate_activations, device),
        Item("loss: logits, their gradient, float32 chunks", 2 * logits + chunks, device),
    )
    return StagePlan("estimate", items, f"batch {facts.batch_size} × {facts.max_length} tokens")


def train_plan(facts: ModelFacts, *, device: str = "cpu") -> StagePlan:
    """A LoRA-SB training step's peak at rank `facts.rank` (see the module doc)."""
    ranks = {name: min(facts.rank, m, n) for name, (m, n) in facts.targets.items()}
    factors = sum(r * (m + n) for r, (m, n) in zip(ranks.values(), facts.targets.values())) * 4
    trained = sum(r * r for r in ranks.values()) * 4
    items = (
        Item(f"weights ({facts.dtype})", facts.weight_bytes, device),
        Item("B, A (float32)", factors, device),
        Item("R, its gradient, AdamW's two states (float32)", 4 * trained, device),
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
) -> Plan:
    """The plans of estimate (accumulators on `accumulate_on`: "cpu" or "device"), train and merge."""
    return Plan(
        facts,
        {
            "estimate": estimate_plan(
                facts, device=device, accumulate_on=accumulate_on, accumulate_dtype=accumulate_dtype
            ),
            "train": train_plan(facts, device=device),
            "merge": merge_plan(facts),
        },
        free or {},
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
    head: str = "causal-lm",
    trust_remote_code: bool = False,
) -> Plan:
    """`lorasb estimate --dry-run`: the plan of every stage for `--model` (alias, hub id, or a local directory —
    config.json alone is enough), with the options resolved as the stages resolve them and what is free now."""
    ref = models.resolve_model(model)
    resolved_device = models.resolve_device(device)
    facts = model_facts(
        ref,
        targets=targets,
        batch_size=batch_size,
        max_length=models.fit_max_length(max_length, MAX_LENGTH, ref, trust_remote_code=trust_remote_code),
        rank=rank,
        dtype=models.resolve_dtype(dtype, resolved_device),
        head=head,
        trust_remote_code=trust_remote_code,
    )
    where = place(resolved_device)
    dtype_ = accumulate_dtype_of(accumulate_dtype)
    free = available_memory({"cpu", where})
    on = resolve_accumulate_on(facts, device=where, accumulate_on=accumulate_on, accumulate_dtype=dtype_, free=free)
    return plan_stages(facts, device=where, accumulate_on=on, accumulate_dtype=dtype_, free=free)


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
    facts: ModelFacts, *, device: str, accumulate_on: str, accumulate_dtype: torch.dtype, free: dict[str, int]
) -> str:
    """`--accumulate-on` as "cpu" or "device": "auto" is "device" on an accelerator when all of estimate fits
    there (no copy to the host per module and batch), else "cpu"."""
    if accumulate_on_of(accumulate_on) != "auto":
        return accumulate_on
    on_device = estimate_plan(facts, device=device, accumulate_on="device", accumulate_dtype=accumulate_dtype)
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
