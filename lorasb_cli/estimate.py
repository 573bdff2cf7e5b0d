"""`lorasb estimate` and `lorasb combine`: the simulated first AdamW step ΔW_avg = −η·sign(G) (DESIGN.md §1, §4).

G = Σ_i ∇_W L_i over the sampled examples, L_i the mean cross-entropy over sample i's supervised tokens.
Per target module, a tensor hook on the module's output sees ∂L/∂y and adds ∂L/∂yᵀ·x into a float32
accumulator; base weights never get `requires_grad`, so no full set of parameter gradients ever exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import artifacts, data, models, system
from .errors import BadInputError, IncompatibleArtifactError, NonFiniteError

log = logging.getLogger("lorasb")


@dataclass
class GradientSums:
    """Float32 G per target module ([m, n], on CPU), and what it was summed over."""

    sums: dict[str, torch.Tensor]
    samples: int
    tokens: int


class _GradientHooks:
    """Hooks that add each target weight's gradient into its accumulator as backward produces it."""

    def __init__(self, model: nn.Module, modules: list[str]):
        named = dict(model.named_modules())
        self.shapes = {name: named[name].weight.shape for name in modules}
        # Created by each module's first gradient, not up front: while the first forward holds its peak of
        # activations, no accumulator memory is in use yet (plain autograd's .grad behaves the same).
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = [named[name].register_forward_hook(self._forward_hook(name)) for name in modules]
        # The inputs are integer ids and no weight requires grad, so make the embeddings' output the
        # leaf that backward flows to; activation gradients are all backward computes besides ours.
        embeddings = model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))

    def _forward_hook(self, name: str):
        def hook(_module, inputs, output):
            if not output.requires_grad:
                return
            held = [inputs[0].detach()]  # released as soon as the gradient arrives

            def on_grad(grad_output: torch.Tensor) -> None:
                x = held.pop()
                grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
                weight_grad = grad_2d.T.mm(x.reshape(-1, x.shape[-1]).to(grad_2d.dtype))
                weight_grad = weight_grad.float().cpu()
                if name in self.sums:
                    self.sums[name].add_(weight_grad)
                else:
                    self.sums[name] = weight_grad

            output.register_hook(on_grad)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for name, shape in self.shapes.items():  # a module no gradient reached (e.g. no supervised token)
            self.sums.setdefault(name, torch.zeros(shape, dtype=torch.float32))
        self.sums = {name: self.sums[name] for name in self.shapes}  # model order


def per_sample_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ over the batch of each sample's loss, and the number of supervised targets.

    Language modelling: logits [batch, T, vocab], labels [batch, T] with data.IGNORE where no loss; a sample's
    loss is its mean next-token cross-entropy. Classification: logits [batch, classes], labels [batch] (class
    ids); a sample's loss is the cross-entropy of its label. Regression: logits [batch, 1], float labels
    [batch]; a sample's loss is its squared error (HF's MSE).
    """
    if labels.dim() == 1 and labels.is_floating_point():  # regression: one output, squared error
        return F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum"), labels.numel()
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    targets = labels[:, 1:]
    token_losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=data.IGNORE, reduction="none"
    ).view(targets.shape)
    counts = (targets != data.IGNORE).sum(dim=1)
    # A sample with no supervised token has loss 0 (it adds nothing), not 0/0.
    return (token_losses.sum(dim=1) / counts.clamp(min=1)).sum(), int(counts.sum())


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch without its labels, on `device`: what the model's forward takes."""
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def sum_gradients(
    model: nn.Module,
    modules: list[str],
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    on_batch: Callable[[int], None] | None = None,
) -> GradientSums:
    """G for each target module over all batches (and all ranks of a process group, if one is running)."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    hooks = _GradientHooks(model, modules)
    samples = tokens = 0
    try:
        for batch in batches:
            logits = model(**model_inputs(batch, device)).logits
            loss, batch_tokens = per_sample_loss_sum(logits, batch["labels"].to(device))
            del logits
            if loss.requires_grad:
                loss.backward()
            samples += batch["input_ids"].shape[0]
            tokens += batch_tokens
            if on_batch is not None:
                on_batch(batch["input_ids"].shape[0])
    finally:
        hooks.remove()
    counts = system.all_reduce_sum(torch.tensor([samples, tokens], dtype=torch.float64))
    for tensor in hooks.sums.values():
        system.all_reduce_sum(tensor)
    for name, tensor in hooks.sums.items():
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(
                f"NaN/Inf in the gradient of {name}",
                hint="run with --dtype float32, check the data for extreme samples, or lower --max-length",
            )
    return GradientSums(sums=hooks.sums, samples=int(counts[0]), tokens=int(counts[1]))


def sign_update(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Update tensors `<module>.weight` = −sign(G) as int8 (0 where G is exactly 0); the scale η lives in metadata."""
    return {f"{name}.weight": torch.sign(g).neg_().to(torch.int8) for name, g in sums.items()}


def load_update(artifact: artifacts.Artifact, name: str) -> torch.Tensor:
    """ΔW_avg of one weight as float32: η·(stored signs)."""
    return artifact.get(name, torch.float32).mul_(artifact.meta["eta"])


@dataclass(frozen=True)
class EstimateConfig:
    model: str
    data: str
    out: str
    split: str = "train"
    size: int | None = None
    data_config: str | None = None
    fields: str | None = None
    format: str = "auto"
    template: str = "auto"
    frac: float | None = None
    samples: int | None = None
    targets: str = "all-linear"
    batch_size: int = 8
    max_length: int = 512
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    eta: float = 1e-5
    raw: bool = False
    shard: str | None = None
    trust_remote_code: bool = False


@dataclass
class EstimateSummary:
    path: Path
    modules: int
    samples: int
    tokens: int
    seconds: float
    peak_memory_bytes: int


def estimate(config: EstimateConfig, progress: Callable[[int, int], None] | None = None) -> EstimateSummary:
    """Load the model and data, sum G over the sample and write the update (or the raw shard).

    `progress(done, total)` is called with sample counts as batches finish.
    """
    if not config.eta > 0:
        raise BadInputError(f"--eta {config.eta} must be positive", hint="the default 1e-5 is a good start")
    shard = data.parse_shard(config.shard)
    ref = models.resolve_model(config.model)
    dataset = data.load_dataset_rows(config.data, config.split, config.data_config, size=config.size,
                                     seed=config.seed, fields=config.fields)  # fmt: skip
    fmt = data.detect_format(dataset.columns, config.format, dataset.source, floats=data.float_labels(dataset.rows))
    template = data.resolve_template(config.template, fmt, dataset.columns)
    drawn = data.sample_indices(len(dataset.rows), frac=config.frac, samples=config.samples, seed=config.seed)
    indices = data.take_shard(drawn, *shard) if shard else drawn
    rank, world = system.init_distributed()
    indices = data.take_shard(indices, rank, world)

    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    labels = data.head_labels(fmt, dataset.rows)
    model, tokenizer = models.load_for_labels(ref, labels, dtype=dtype, device=device, seed=config.seed,
                                              trust_remote_code=config.trust_remote_code)  # fmt: skip
    modules = models.resolve_targets(model, config.targets)
    shapes = models.target_shapes(model, modules)
    # Only the drawn rows are read and tokenized.
    examples = data.encode([dataset.rows[i] for i in indices], fmt, tokenizer, config.max_length, labels, template)

    done = 0

    def on_batch(batch_samples: int) -> None:
        nonlocal done
        done += batch_samples
        if progress is not None:
            progress(done, len(examples))

    start = time.perf_counter()
    batches = data.make_batches(examples, config.batch_size, tokenizer.pad_token_id)
    result = sum_gradients(model, modules, batches, on_batch=on_batch)
    seconds = time.perf_counter() - start

    meta = artifacts.provenance(
        "update-raw" if config.raw else "update",
        base_model=ref.provenance(models.fingerprint(shapes)),
        targets=config.targets,
        method="lorasb",
        data={
            **dataset.provenance(),
            "format": fmt,
            "template": template,
            "drawn": len(drawn),
            "frac": config.frac,
            "seed": config.seed,
            "shard": list(shard) if shard else None,
            "max_length": config.max_length,
        },
        samples=result.samples,
        tokens=result.tokens,
        seed=config.seed,
        eta=config.eta,
        dtype=str(dtype).removeprefix("torch."),
        **models.head_provenance(model, labels),
    )
    tensors = (
        {f"{name}.weight": g for name, g in result.sums.items()} if config.raw else sign_update(result.sums)
    )
    # The random head G was computed through: train must start from exactly this head (DESIGN.md §1).
    tensors |= models.head_tensors(model)
    if rank == 0:
        artifacts.write_artifact(config.out, tensors, meta)
    return EstimateSummary(
        path=Path(config.out),
        modules=len(modules),
        samples=result.samples,
        tokens=result.tokens,
        seconds=seconds,
        peak_memory_bytes=system.peak_memory_bytes(device),
    )


# What every raw shard of one estimate must share for their sum to be that estimate.
_SAMPLING_KEYS = ("source", "split", "digest", "format", "template", "drawn", "frac", "seed", "max_length")


def combine(paths: list[str], out: str) -> Path:
    """Sum raw shards' G and write the sign update; refuses shards of different models, targets or samplings."""
    if not paths:
        raise BadInputError("no shards given", hint="pass the files written by estimate --raw --shard i/N")
    shards = [artifacts.Artifact(p, kinds=("update-raw",)) for p in paths]
    first = shards[0]
    for shard in shards[1:]:
        for what, key in (("base model", "base_model"), ("targets", "targets"), ("eta", "eta")):
            if shard.meta[key] != first.meta[key]:
                raise IncompatibleArtifactError(
                    f"shards differ in {what}: {first.meta[key]} vs {shard.meta[key]}",
                    path=shard.path,
                    hint="combine only shards of one estimate",
                )
        for key in _SAMPLING_KEYS:
            if shard.meta["data"].get(key) != first.meta["data"].get(key):
                raise IncompatibleArtifactError(
                    f"shards come from different samplings (data {key}: "
                    f"{first.meta['data'].get(key)} vs {shard.meta['data'].get(key)})",
                    path=shard.path,
                    hint="run every shard with the same --data, --split, --frac/--samples, --seed and --max-length",
                )
        if shard.names != first.names:
            raise IncompatibleArtifactError("shards hold different modules", path=shard.path)
    _check_shard_set(shards)

    # One module's float32 sum at a time; only the int8 signs of all modules are held. A classifier's head is
    # the same in every shard (same seed): it is carried over, not summed.
    head = first.meta.get("head", [])
    update: dict[str, torch.Tensor] = {name: first.get(name) for name in head}
    for name in first.names:
        if name not in head:
            total = sum(shard.get(name, torch.float32) for shard in shards)
            update.update(sign_update({name.removesuffix(".weight"): total}))
    meta = artifacts.provenance(
        "update",
        base_model=first.meta["base_model"],
        targets=first.meta["targets"],
        method=first.meta["method"],
        data={**first.meta["data"], "shard": None, "combined_from": len(shards)},
        samples=sum(s.meta["samples"] for s in shards),
        tokens=sum(s.meta["tokens"] for s in shards),
        seed=first.meta["seed"],
        eta=first.meta["eta"],
        dtype=first.meta["dtype"],
        **{key: first.meta[key] for key in ("architecture", "labels", "head") if key in first.meta},
    )
    return artifacts.write_artifact(out, update, meta)


def _check_shard_set(shards: list[artifacts.Artifact]) -> None:
    """Shards of `--shard i/N` must be all N, each once; unsharded raw files combine only alone."""
    tags = [tuple(s.meta["data"]["shard"]) if s.meta["data"].get("shard") else None for s in shards]
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
