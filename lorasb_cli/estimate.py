"""`lorasb estimate` and `lorasb combine`: the simulated first AdamW step ΔW_avg = −η·sign(G) (docs/design.md §1, §4).

G = Σ_i ∇_W L_i over the sampled examples, L_i the mean cross-entropy over sample i's supervised tokens.
Per target module, a tensor hook on the module's output sees ∂L/∂y and adds ∂L/∂yᵀ·x into a float32
accumulator; base weights never get `requires_grad`, so no full set of parameter gradients ever exists.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import (
    artifacts,
    data,
    files,
    fsdp,
    held_inputs,
    linalg,
    loss,
    metadata,
    models,
    plan,
    stability,
    system,
    templates,
)
from .configs import CombineConfig, EstimateConfig
from .errors import BadInputError, IncompatibleArtifactError, NonFiniteError
from .options import MAX_LENGTH

log = logging.getLogger("lorasb")


@dataclass
class GradientSums:
    """G per target module ([m, n], in the accumulators' dtype and place: float32 on CPU by default), and what
    it was summed over."""

    sums: dict[str, torch.Tensor]
    samples: int
    tokens: int

    def add(self, other: GradientSums) -> GradientSums:
        """This sum plus `other`'s (the two halves of estimate --report-ranks), in place; frees `other`'s sums."""
        for name, g in self.sums.items():
            g.add_(other.sums.pop(name))
        self.samples, self.tokens = self.samples + other.samples, self.tokens + other.tokens
        return self


class _GradientHooks:
    """Hooks that add each target weight's gradient into its accumulator as backward produces it.

    Accumulators live on `accumulate_device` in `accumulate_dtype`. Each batch's gradient ∂L/∂yᵀ·x is one matmul
    (float32 sums inside it); only the running sum across batches is rounded to `accumulate_dtype`. With `owners`
    (--strategy fsdp: module → rank) each batch's gradient is summed over the ranks into its owner's accumulator,
    and a rank holds only the accumulators it owns.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: list[str],
        *,
        accumulate_device: torch.device | None = None,
        accumulate_dtype: torch.dtype = torch.float32,
        owners: dict[str, int] | None = None,
    ):
        named = dict(model.named_modules())
        self.owners, rank = owners, system.launcher_rank()[0]
        # (out, in) features: a quantized weight is packed
        self.shapes = {
            name: models.linear_shape(named[name]) for name in modules if owners is None or owners[name] == rank
        }
        self.device = accumulate_device or torch.device("cpu")
        self.dtype = accumulate_dtype
        # Created by each module's first gradient, not up front: while the first forward holds its peak of
        # activations, no accumulator memory is in use yet (plain autograd's .grad behaves the same).
        self.sums: dict[str, torch.Tensor] = {}
        self._last: tuple[weakref.ref, _HeldInput] | None = None  # the input the previous target read
        self._handles = [named[name].register_forward_hook(self._forward_hook(name)) for name in modules]
        # The inputs are integer ids and no weight requires grad, so make the embeddings' output the
        # leaf that backward flows to; activation gradients are all backward computes besides ours.
        embeddings = model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))

    def _forward_hook(self, name: str):
        def hook(_module, inputs, output):
            if not output.requires_grad:
                return
            held = self._held(inputs[0])

            def on_grad(grad_output: torch.Tensor) -> None:
                x = held.take()
                grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
                weight_grad = grad_2d.T.mm(x.reshape(-1, x.shape[-1]).to(grad_2d.dtype))
                del x
                if self.owners is not None:
                    # Every rank calls this hook for every module in one autograd order, so the reduces pair up.
                    weight_grad = system.reduce_to(weight_grad.to(self.dtype), self.owners[name])
                    if name not in self.shapes:
                        return
                if name in self.sums:
                    # One rounding per batch: add_ computes in float32 and rounds into a bf16 accumulator.
                    self.sums[name].add_(weight_grad.to(self.device))
                else:
                    # The matmul's own result becomes the accumulator when dtype and place already match.
                    self.sums[name] = weight_grad.to(device=self.device, dtype=self.dtype)

            output.register_hook(on_grad)

        return hook

    def _held(self, x: torch.Tensor) -> _HeldInput:
        """The holder of a target's input x: shared with the previous target when it read the same tensor."""
        if self._last is not None and self._last[0]() is x:
            holder = self._last[1]
        else:
            holder = _HeldInput(held_inputs.held_input(x)[0])
            self._last = (weakref.ref(x), holder)
        holder.users += 1
        return holder

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None
        for name, shape in self.shapes.items():
            if name not in self.sums:  # a module no gradient reached (e.g. no supervised token)
                self.sums[name] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.sums = {name: self.sums[name] for name in self.shapes}  # model order


class _HeldInput:
    """One target input for the targets that read it (q/k/v read one tensor, gate/up another): made once, when
    the first of their gradients arrives (a rebuild, or the held tensor), and dropped after the last takes it."""

    def __init__(self, source: Callable[[], torch.Tensor]):
        self.source: Callable[[], torch.Tensor] | None = source
        self.value: torch.Tensor | None = None
        self.users = 0

    def take(self) -> torch.Tensor:
        if self.value is None:
            self.value = self.source()
        x = self.value
        self.users -= 1
        if self.users == 0:
            self.source = self.value = None
        return x


def sum_gradients(
    model: nn.Module,
    modules: list[str],
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    on_batch: Callable[[int], None] | None = None,
    accumulate_on: torch.device | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    start: GradientSums | None = None,
    owners: dict[str, int] | None = None,
) -> GradientSums:
    """G for each target module over all batches (and all ranks of a process group, if one is running).

    The accumulators ([m, n] per target) live on `accumulate_on` (default CPU) in `accumulate_dtype`. `start`: a
    sum to go on adding into, in place (one process only: its sums were all-reduced already). `owners` (module →
    rank, for a model sharded by --strategy fsdp): each module's G only on its owner, whose `sums` hold only its
    own modules.

    bfloat16 against float32: half the memory (2 instead of 4 bytes per target weight entry: 13 instead of 26 GiB
    for Mistral-7B). Within a batch nothing changes: ∂L/∂yᵀ·x is one matmul that sums its tokens in float32.
    Across batches each batch's gradient is rounded once into the running sum, to 8 significant bits, so after
    b batches an entry can be off by up to 2⁻⁸·Σ|partial sums| (tests/test_estimate.py checks this bound). The
    update keeps only the sign of G, and wherever |G| is above that bound the sign is G's; the entries whose
    sign can differ are those near 0, whose sign float32 noise and the sample draw already make arbitrary. With
    many small batches (e.g. 50 batches of 1) the bound grows with b: prefer float32 when it fits, or bigger
    batches. (The reference implementation sums bf16 batch-mean losses: coarser still.)
    """
    device = next(model.parameters()).device
    model.requires_grad_(False)
    hooks = _GradientHooks(
        model, modules, accumulate_device=accumulate_on, accumulate_dtype=accumulate_dtype, owners=owners
    )
    samples = tokens = 0
    if start is not None:
        hooks.sums, samples, tokens = start.sums, start.samples, start.tokens
    try:
        for batch, counts in _batches_in_step(batches, sharded=owners is not None):
            logits = model(**loss.model_inputs(batch, device)).logits
            total, batch_tokens = loss.per_sample_loss_sum(logits, batch["labels"].to(device))
            del logits
            if total.requires_grad:
                (total if counts else total * 0).backward()
            if counts:
                samples += batch["input_ids"].shape[0]
                tokens += batch_tokens
                if on_batch is not None:
                    on_batch(batch["input_ids"].shape[0])
    finally:
        hooks.remove()
    counts = system.all_reduce_sum(torch.tensor([samples, tokens], dtype=torch.float64))
    if owners is None:
        for tensor in hooks.sums.values():
            system.all_reduce_sum(tensor)
    # A finite Σg² means every entry is finite (an Inf or NaN entry makes it Inf or NaN): one BLAS pass instead of
    # isfinite's five elementwise ones (profiled: 3% of a pass). Only an overflowing Σg² checks entries.
    finite = {
        name: bool(torch.isfinite(torch.dot(t.view(-1), t.view(-1))) or torch.isfinite(t).all())
        for name, t in hooks.sums.items()
    }
    if owners is not None:  # each rank checked its own modules: every rank learns of any
        flags = system.all_reduce_sum(torch.tensor([not finite.get(m, True) for m in modules], dtype=torch.float64))
        finite = {m: not flag for m, flag in zip(modules, flags.tolist())}
    failed = [name for name in modules if not finite.get(name, True)]
    if failed:
        raise NonFiniteError(
            f"NaN/Inf in the gradient of {failed[0]}",
            hint="run with --dtype float32, check the data for extreme samples, or lower --max-length",
        )
    return GradientSums(sums=hooks.sums, samples=int(counts[0]), tokens=int(counts[1]))


def _batches_in_step(
    batches: Iterable[dict[str, torch.Tensor]], *, sharded: bool
) -> Iterable[tuple[dict[str, torch.Tensor], bool]]:
    """(batch, whether it counts) for each batch; a sharded model's ranks all run as many passes as the rank with
    the most batches (each pass gathers weights from every rank), the extra ones a repeat that adds 0."""
    if not sharded:
        yield from ((batch, True) for batch in batches)
        return
    batches = list(batches)
    most = int(system.all_reduce_max(torch.tensor([len(batches)], dtype=torch.float64)).item())
    yield from ((batch, True) for batch in batches)
    yield from ((batches[0], False) for _ in range(most - len(batches)))


def sign_update(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Update tensors `<module>.weight` = −sign(G) as int8 (0 where G is exactly 0); the scale η lives in metadata."""
    return {f"{name}.weight": torch.sign(g).neg_().to(torch.int8) for name, g in sums.items()}


@dataclass
class EstimateSummary:
    path: Path
    modules: int
    samples: int
    sampling: str  # why `samples` is what it is (the options and the split's size)
    tokens: int
    seconds: float
    peak_memory_bytes: int
    accumulate_on: str = "cpu"  # where the accumulators were: "cpu" or the device, e.g. "cuda:0"
    accumulate_dtype: str = "float32"
    planned_bytes: dict[str, int] | None = None  # plan.estimate_plan's need on each place
    stability: dict | None = None  # --report-ranks: stability.stability's report
    samples_auto: dict | None = None  # --samples auto: the count it settled on and the curve


@dataclass
class _Sample:
    """What an estimate reads before any weight: the model, the rows, their format and the drawn indices."""

    ref: models.ModelRef
    dataset: data.Dataset
    fmt: str
    template: str | None
    system_prompt: str | None
    labels: list[str] | None
    drawn: list[int]  # the sample of the whole job
    indices: list[int]  # this process's part of it
    shard: tuple[int, int] | None
    sampling: str  # why the sample has its size, e.g. "--frac 0.001 of 64 rows is 1, raised to --min-samples 32"


def estimate(config: EstimateConfig, progress: Callable[[int, int], None] | None = None) -> EstimateSummary:
    """Load the model and data, sum G over the sample and write the update (or the raw shard).

    `progress(done, total)` is called with sample counts as batches finish.
    """
    config = dataclasses.replace(config, strategy=system.launcher_strategy(config.strategy))
    # Before any data is read, and before the plan, which builds batches of it.
    max_length = models.fit_max_length(
        config.max_length, MAX_LENGTH, models.resolve_model(config.model), trust_remote_code=config.trust_remote_code
    )
    config = dataclasses.replace(config, max_length=max_length)
    sample = _read_sample(config)
    device, dtype = models.placement(config.device, config.dtype)
    accumulate_on, planned = _plan_accumulators(config, sample, device, dtype)
    model, tokenizer = models.load_model(
        sample.ref,
        device=fsdp.load_device(config.strategy, device),
        dtype=dtype,
        quantize=config.quantize,
        trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle,
        labels=sample.labels,
        seed=config.seed,
    )
    modules = models.resolve_targets(model, config.targets)
    shapes = models.target_shapes(model, modules)
    report_ranks = stability.parse_ranks(config.report_ranks, shapes)
    head = models.head_tensors(model)  # the update carries it whole, however the model is sharded below
    owners = None
    if fsdp.sharding(config.strategy):
        fsdp.shard_base(model, device)
        owners = accumulator_owners(shapes, system.launcher_rank()[1])
    passes = _Passes(
        config,
        sample,
        model,
        modules,
        tokenizer,
        device if accumulate_on == "device" else torch.device("cpu"),
        progress,
        owners,
    )
    start = time.perf_counter()
    records = {}
    if config.samples == "auto":
        result, records["samples_auto"] = _sum_until_stable(config, passes)
    elif report_ranks:
        result, records["stability"] = _sum_halves(config, passes, report_ranks)
    else:
        result = passes.sums(sample.indices)
    seconds = time.perf_counter() - start
    data.check_supervised(result.tokens, f"the {result.samples} samples drawn", config.max_length)
    tensors = _update_tensors(config, shapes, result, owners) | head
    if system.is_main_process():
        _write_update(config, sample, shapes, model, result, dtype, records, tensors)
    return EstimateSummary(
        path=Path(config.out),
        modules=len(modules),
        samples=result.samples,
        sampling=sample.sampling,
        tokens=result.tokens,
        seconds=seconds,
        peak_memory_bytes=system.peak_memory_bytes(device),
        accumulate_on=plan.place(device) if accumulate_on == "device" else "cpu",
        accumulate_dtype=config.accumulate_dtype,
        planned_bytes=planned,
        **records,
    )


@dataclass
class _Passes:
    """sum_gradients over some of the drawn rows with the run's model, targets, batches and accumulators; only
    the rows a pass reads are tokenized. Progress counts samples against the whole draw."""

    config: EstimateConfig
    sample: _Sample
    model: nn.Module
    modules: list[str]
    tokenizer: object
    accumulate_on: torch.device
    progress: Callable[[int, int], None] | None
    owners: dict[str, int] | None = None  # --strategy fsdp: the rank that sums each module's G
    done: int = 0

    def sums(self, indices: list[int], start: GradientSums | None = None) -> GradientSums:
        config, sample = self.config, self.sample
        rows = [sample.dataset.rows[i] for i in indices]
        examples = data.encode(
            rows, sample.fmt, self.tokenizer, config.max_length, sample.labels, sample.template, sample.system_prompt
        )
        return sum_gradients(
            self.model,
            self.modules,
            data.make_batches(examples, config.batch_size, self.tokenizer.pad_token_id),
            on_batch=self._on_batch,
            accumulate_dtype=plan.accumulate_dtype_of(config.accumulate_dtype),
            accumulate_on=self.accumulate_on,
            start=start,
            owners=self.owners,
        )

    def _on_batch(self, batch_samples: int) -> None:
        self.done += batch_samples
        if self.progress is not None:
            self.progress(self.done, len(self.sample.indices))


def _sum_halves(config: EstimateConfig, passes: _Passes, ranks: list[int]) -> tuple[GradientSums, dict | None]:
    """--report-ranks: G of each half of the drawn sample apart (this process summing its part of each), their
    stability report, then G. The halves are the job's, so any number of processes reports what one does."""
    drawn, (rank, world) = passes.sample.drawn, system.init_distributed()
    half = (len(drawn) + 1) // 2
    first, second = (passes.sums(data.take_shard(part, rank, world)) for part in (drawn[:half], drawn[half:]))
    report = None
    if system.is_main_process():  # every rank holds both all-reduced halves; one reports
        report = stability.stability(first.sums, second.sums, ranks, niter=linalg.DEFAULT_NITER, seed=config.seed)
        report["samples"] = [first.samples, second.samples]
    return first.add(second), report


def _sum_until_stable(config: EstimateConfig, passes: _Passes) -> tuple[GradientSums, dict]:
    """--samples auto: G over doubling prefixes of the drawn rows (one batch, 2×, 4×, ... up to --max-samples)
    until the top-`config.rank` subspaces of two successive estimates overlap by ≥ --threshold (the mean over
    modules of B's and A's sides: stability.overlap). A prefix of the draw is the --samples draw of its size."""
    indices, total, previous, curve = passes.sample.indices, None, None, []
    ends = [min(config.batch_size * 2**k, len(indices)) for k in range(len(indices).bit_length() + 1)]
    done = 0
    for end in dict.fromkeys(ends):  # increasing, the last one the whole draw
        total = passes.sums(indices[done:end], start=total)
        done = end
        bases = stability.top_subspaces(total.sums, config.rank, niter=linalg.DEFAULT_NITER, seed=config.seed)
        value = stability.mean_overlap(previous, bases) if previous is not None else None
        curve.append({"samples": total.samples, "overlap": value})
        log.info("--samples auto: %d samples, overlap with the previous estimate %s", total.samples, value)
        if value is not None and value >= config.threshold:
            break
        previous = bases
    reached = value is not None and value >= config.threshold
    if not reached:
        log.warning(
            "--samples auto: the overlap stayed below %g up to --max-samples %d; the estimate uses all of them",
            config.threshold,
            total.samples,
        )
    settings = {"rank": config.rank, "threshold": config.threshold, "max_samples": config.max_samples}
    return total, settings | {"samples": total.samples, "reached": reached, "curve": curve}


def _check_modes(config: EstimateConfig) -> None:
    """--report-ranks and --samples auto need the whole sample in one estimate; --world-size only plans."""
    fsdp.check_supported(config.strategy, config.quantize)
    if config.world_size is not None:
        raise BadInputError(
            "--world-size sizes a planned job (--dry-run); a run's processes are its launcher's",
            hint="drop --world-size, or add --dry-run",
        )
    if config.report_ranks and config.raw:
        raise BadInputError(
            "--report-ranks compares two halves of the whole sample; a --raw shard holds one part of it",
            hint="drop --report-ranks, or estimate without --raw",
        )
    if config.report_ranks and config.strategy == "fsdp":
        raise BadInputError(
            "--report-ranks compares whole sums of two halves; --strategy fsdp spreads them over the processes",
            hint="drop --report-ranks, or use --strategy ddp",
        )
    if config.samples != "auto":
        return
    for clash, given in (("--raw", config.raw), ("--report-ranks", config.report_ranks), ("--frac", config.frac)):
        if given:
            raise BadInputError(f"--samples auto settles one estimate by itself: drop {clash}")
    if system.launcher_rank()[1] > 1:
        raise BadInputError(
            "--samples auto runs in one process", hint="run it without a launcher, then --samples N under one"
        )


def _read_sample(config: EstimateConfig) -> _Sample:
    """The checked options, the rows and this process's indices of the sample (joins the launcher's group)."""
    shard = data.parse_shard(config.shard)
    _check_modes(config)
    if shard is not None and not config.raw:
        raise BadInputError(
            "--shard writes one part of a sum: it needs --raw", hint="pass --raw, then lorasb combine the parts"
        )
    ref = models.resolve_model(config.model)
    files.check_output(config.out, {"model": ref.path, "data": config.data})
    dataset = data.load_dataset_rows(
        config.data, config.split, config.data_config, size=config.size, seed=config.seed, fields=config.fields
    )
    fmt = data.detect_format(dataset.columns, config.format, dataset.source, floats=data.float_labels(dataset.rows))
    dataset = data.checked(dataset, fmt, every_row=False)  # the drawn rows are checked as they are read
    template = templates.resolve(config.template, dataset.columns, fmt, announce=True)
    system_prompt = templates.system_prompt(config.system_prompt, template, dataset.rows)
    auto, population = config.samples == "auto", len(dataset.rows)
    count, why = data.sample_count(
        population,
        frac=config.frac,
        samples=min(config.max_samples, population) if auto else config.samples,
        min_samples=config.min_samples,
    )
    why = "--samples auto, at most" if auto else why
    log.info("sample: %d of %d rows (%s)", count, population, why)
    drawn = data.sample_indices(population, frac=None, samples=count, seed=config.seed)
    indices = data.take_shard(drawn, *shard) if shard else drawn
    rank, world = system.init_distributed()
    if config.strategy == "fsdp" and len(indices) < world:  # each rank's passes repeat one of its own batches
        raise BadInputError(
            f"--strategy fsdp: {len(indices)} samples for {world} processes", hint="draw at least one per process"
        )
    indices = data.take_shard(indices, rank, world)
    labels = data.head_labels(fmt, dataset.rows)
    return _Sample(ref, dataset, fmt, template, system_prompt, labels, drawn, indices, shard, why)


def _plan_accumulators(
    config: EstimateConfig, sample: _Sample, device: torch.device, dtype: torch.dtype
) -> tuple[str, dict[str, int] | None]:
    """Before any weight is read: where G's accumulators live ("cpu" or "device") and the planned bytes per
    place, or a one-line refusal when the run cannot fit."""
    accumulate_dtype = plan.accumulate_dtype_of(config.accumulate_dtype)
    accumulate_on = plan.accumulate_on_of(config.accumulate_on)
    where = plan.place(device)
    try:
        facts = plan.model_facts(
            sample.ref,
            targets=config.targets,
            batch_size=max(1, min(config.batch_size, len(sample.indices))),
            max_length=config.max_length,
            dtype=dtype,
            quantize=config.quantize,
            train=False,
            head="causal-lm" if sample.labels is None else "sequence-classification",
            trust_remote_code=config.trust_remote_code,
        )
    except (RuntimeError, NotImplementedError) as e:  # model code that cannot run on the meta device
        log.warning("no memory plan for %s (%s: %s); memory is not checked", sample.ref.id, type(e).__name__, e)
        return ("cpu" if accumulate_on == "auto" else accumulate_on), None
    facts = dataclasses.replace(facts, accumulator_sets=2 if config.report_ranks else 1)
    if config.strategy == "fsdp":  # this process's share: 1/N of the weights, the accumulators it owns
        (rank, world), targets = system.launcher_rank(), facts.targets
        owners = accumulator_owners(targets, world)
        mine = {name: shape for name, shape in targets.items() if owners[name] == rank}
        facts = dataclasses.replace(facts, weight_bytes=facts.weight_bytes // world, targets=mine)
    accumulate_on = plan.choose_accumulation(
        facts, device=where, accumulate_on=config.accumulate_on, accumulate_dtype=accumulate_dtype
    )
    planned = plan.estimate_plan(facts, device=where, accumulate_on=accumulate_on, accumulate_dtype=accumulate_dtype)
    return accumulate_on, planned.need()


def accumulator_owners(shapes: dict[str, tuple[int, int]], world: int) -> dict[str, int]:
    """The rank that holds each module's accumulator (--strategy fsdp): largest first, each onto the rank with the
    fewest entries so far (the lowest such rank), so every rank holds about 1/world of them."""
    load = [0] * world
    owners = {}
    for name in sorted(shapes, key=lambda n: shapes[n][0] * shapes[n][1], reverse=True):
        owners[name] = min(range(world), key=lambda r: load[r])
        load[owners[name]] += shapes[name][0] * shapes[name][1]
    return owners


def _update_tensors(
    config: EstimateConfig, shapes: dict[str, tuple[int, int]], result: GradientSums, owners: dict[str, int] | None
) -> dict[str, torch.Tensor]:
    """The update's tensors (int8 signs, or with --raw the float32 sums) on the CPU of global rank 0; empty on the
    others. Signs are taken where G lives; only int8 (or the float32 raw sums) cross to the CPU, and with `owners`
    to rank 0, one module at a time."""

    def finished(name: str, g: torch.Tensor) -> torch.Tensor:
        return g.float().cpu() if config.raw else sign_update({name: g})[f"{name}.weight"].cpu()

    if owners is None:
        main = system.is_main_process()
        return {f"{name}.weight": finished(name, g) for name, g in result.sums.items()} if main else {}
    tensors = {}
    for name, shape in shapes.items():
        mine = finished(name, result.sums[name]) if name in result.sums else None
        moved = system.to_main(mine, owners[name], shape, torch.float32 if config.raw else torch.int8)
        if moved is not None:
            tensors[f"{name}.weight"] = moved
    return tensors


def _write_update(
    config: EstimateConfig,
    sample: _Sample,
    shapes: dict[str, tuple[int, int]],
    model: nn.Module,
    result: GradientSums,
    dtype: torch.dtype,
    records: dict,
    tensors: dict[str, torch.Tensor],
) -> None:
    """The update file (`tensors`: the signs or raw sums, and a classifier's head) with its provenance."""
    kind = metadata.RawShardMeta if config.raw else metadata.UpdateMeta
    meta = kind(
        base_model=sample.ref.provenance(models.fingerprint(shapes), config.quantize),
        targets=config.targets,
        method="lorasb",
        data=metadata.DataProvenance.from_dataset(
            sample.dataset,
            format=sample.fmt,
            template=sample.template,
            system_prompt=sample.system_prompt,
            drawn=result.samples if config.samples == "auto" else len(sample.drawn),
            frac=config.frac,
            min_samples=config.min_samples,
            seed=config.seed,
            shard=list(sample.shard) if sample.shard else None,
            max_length=config.max_length,
        ),
        samples=result.samples,
        tokens=result.tokens,
        seed=config.seed,
        eta=config.eta,
        dtype=str(dtype).removeprefix("torch."),
        **records,  # stability, samples_auto
        **models.head_meta(models.HeadSpec.from_model(model, sample.labels)),
    )
    artifacts.write_artifact(config.out, tensors, meta)


# What every raw shard of one estimate must share for their sum to be that estimate (RawShardMeta): identities,
# never paths: the same model and data copied to two machines agree. The paths (`base_model.id`, `data.source`) are
# only reported. `digest` is of the rows (data.load_dataset_rows), `weights_digest` of the checkpoint's tensors
# (models.weights_digest), `fingerprint` of the target modules' names and shapes, `quantization` the --quantize.
_BASE_IDENTITY = {"fingerprint": "target modules", "weights_digest": "weights", "quantization": "quantization"}


@artifacts.honours_allow_unverified
def combine(config: CombineConfig, progress: Callable[[int, int], None] | None = None) -> Path:
    """Sum raw shards' G and write the sign update; refuses shards of different models, targets or samplings.
    `progress(done, total)` counts modules."""
    paths, out = list(config.parts), config.out
    if not paths:
        raise BadInputError("no shards given", hint="pass the files written by estimate --raw --shard i/N")
    files.check_output(out, {f"shard {p}": p for p in paths})
    shards = [artifacts.Artifact(p, kinds=("update-raw",)) for p in paths]
    first = shards[0]
    for shard in shards[1:]:
        _check_same_estimate(first, shard)
    _check_shard_set(shards)
    metas = [shard.meta for shard in shards]
    for what, paths_seen in (
        ("model", {m.base_model.id for m in metas}),
        ("data", {m.data.source for m in metas}),
    ):
        if len(paths_seen) > 1:
            log.info("shards read the %s from %s; their digests agree", what, ", ".join(sorted(map(str, paths_seen))))

    # One module's float32 sum at a time; only the int8 signs of all modules are held. A classifier's head is
    # the same in every shard (same seed): it is carried over, not summed.
    head = first.meta.head
    update: dict[str, torch.Tensor] = {name: first.get(name) for name in head}
    modules = [name for name in first.names if name not in head]
    for done, name in enumerate(modules, start=1):
        total = sum(shard.get(name, torch.float32) for shard in shards)
        update.update(sign_update({name.removesuffix(".weight"): total}))
        if progress is not None:
            progress(done, len(modules))
    return artifacts.write_artifact(out, update, metadata.UpdateMeta.from_shards(metas))


def _check_same_estimate(first: artifacts.Artifact, shard: artifacts.Artifact) -> None:
    """`shard` sums G over another part of `first`'s sample: same model, targets, η and sampling."""
    mine, theirs = first.meta, shard.meta
    for name, what in _BASE_IDENTITY.items():
        if getattr(mine.base_model, name) != getattr(theirs.base_model, name):
            raise IncompatibleArtifactError(
                f"shards differ in base model {what}: {getattr(mine.base_model, name)} ({mine.base_model.id}) vs "
                f"{getattr(theirs.base_model, name)} ({theirs.base_model.id})",
                path=shard.path,
                hint="run every shard on the same checkpoint (copies in other folders agree) and --targets",
            )
    for what in ("targets", "eta"):
        if getattr(theirs, what) != getattr(mine, what):
            raise IncompatibleArtifactError(
                f"shards differ in {what}: {_shown(getattr(mine, what))} vs {_shown(getattr(theirs, what))}",
                path=shard.path,
                hint="combine only shards of one estimate",
            )
    drawn, other = mine.data.sampling(), theirs.data.sampling()
    for key, value in drawn.items():
        if other[key] != value:
            raise IncompatibleArtifactError(
                f"shards come from different samplings (data {key}: {_shown(value)} vs {_shown(other[key])})",
                path=shard.path,
                hint="run every shard with the same --data, --split, --frac/--samples, --seed and --max-length",
            )
    if shard.names != first.names:
        raise IncompatibleArtifactError("shards hold different modules", path=shard.path)


def _shown(value: object) -> object:
    """A metadata value as the JSON recorded it (a list of targets, not the tuple it is read as)."""
    return list(value) if isinstance(value, tuple) else value


def _check_shard_set(shards: list[artifacts.Artifact]) -> None:
    """Shards of `--shard i/N` must be all N, each once; unsharded raw files combine only alone."""
    tags = [tuple(s.meta.data.shard) if s.meta.data.shard else None for s in shards]
    if None in tags:
        if len(shards) > 1:
            raise IncompatibleArtifactError(
                "a raw update without --shard holds the whole sample and cannot be summed with others",
                path=shards[tags.index(None)].path,
            )
        return
    count = tags[0][1]
    seen: dict[int, str] = {}
    for shard, (index, _) in zip(shards, tags):
        if index in seen:
            raise IncompatibleArtifactError(f"shard {index}/{count} given twice", path=shard.path)
        seen[index] = shard.path
    missing = [f"{i}/{count}" for i in range(count) if i not in seen]
    if missing:
        raise IncompatibleArtifactError(
            f"missing shard(s) {', '.join(missing)}", hint=f"pass all {count} shards written by --shard i/{count}"
        )
