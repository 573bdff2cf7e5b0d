"""`lorasb decompose`: one matrix per target module → B [m, r], R [r, r], A [r, n] by the init `--init`
(lorasb_cli/inits). The default, `lorasb`, is the truncated SVD of ΔW_avg ≈ U S Vᵀ: B = U_r, R = diag(S_r),
A = V_rᵀ; B and A are orthonormal and η scales R only. The randomized SVD must stay within 1% of the
Eckart–Young optimum ‖ΔW − trunc_r(ΔW)‖_F (docs/design.md §4); `exact` runs the full SVD.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import artifacts, budget, files, inits, linalg, metadata, models
from .configs import DecomposeConfig
from .errors import BadInputError, IncompatibleArtifactError


@dataclass
class DecomposeSummary:
    path: Path
    rank: int  # the most common rank; `ranks` has each module's
    energy: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    def by_kind(self) -> list[tuple[str, int, str, float, float, float]]:
        """(module kind with layer numbers as *, count, its ranks "r" or "lo–hi", mean, min, max of the captured
        energy)."""
        groups: dict[str, list[str]] = {}
        for module in self.energy:
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", module), []).append(module)
        rows = []
        for kind, modules in groups.items():
            energy, ranks = [self.energy[m] for m in modules], sorted({self.ranks.get(m, self.rank) for m in modules})
            shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
            rows.append((kind, len(modules), shown, sum(energy) / len(energy), min(energy), max(energy)))
        return rows


@dataclass
class _Source:
    """The matrices an init factors, one per target module, and what the factors file inherits: the update's
    metadata (None for the weights of a model alone), the base model and the targets."""

    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    matrix: Callable[[str], torch.Tensor]
    update: metadata.UpdateMeta | None
    base_model: metadata.BaseIdentity
    targets: str | tuple[str, ...] | None

    @property
    def head(self) -> tuple[str, ...]:
        """A classifier's head tensors: carried over as they are, not factored."""
        return self.update.head if self.update is not None else ()


@artifacts.honours_allow_unverified
def decompose(config: DecomposeConfig, progress: Callable[[int, int], None] | None = None) -> DecomposeSummary:
    """Factor one matrix per target module with the init `config.init` and write `<module>.lora_{B,R,A}`.

    The matrix is ΔW_avg from the update at `config.update`, or W0 of `config.model` for a weight-based init
    (`lora-xs`); such an init takes its modules, classifier head and labels from the update when one is
    given (so it starts from the same head as LoRA-SB), else from the model and `config.targets`.
    """
    init, own = _check(config)
    files.check_output(config.out, {"update": config.update})
    update = artifacts.Artifact(config.update, kinds=("update",)) if config.update is not None else None
    source = _weight_source(config, init, update) if init.source == "model" else _update_source(update)
    config = replace(config, rank=_reference_rank(config, len(source.modules)))
    linalg.check_rank(config.rank, source.shapes, update.path if update is not None else None)
    settings = inits.InitOptions(
        niter=config.niter, exact=config.exact, eta=source.update.eta if source.update else None, own=own
    )
    ranks, allocation = _ranks(config, source, progress)
    if allocation is not None and progress is not None:  # the spectra were the first half of the work
        progress = functools.partial(_second_half, progress, len(source.modules))
    factors, energy = _factor_all(config, init, settings, source, ranks, progress)
    factors |= {name: update.get(name) for name in source.head}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    meta = metadata.FactorsMeta.from_update(
        source.update,
        base_model=source.base_model,
        targets=source.targets,
        init=config.init,
        rank=rank,
        **({"rank_pattern": {m: r for m, r in ranks.items() if r != rank}, "budget": allocation} if allocation else {}),
        scale=init.scale,
        seed=config.seed,
        svd={"exact": config.exact, "niter": config.niter, "oversampling": linalg.oversampling(config.rank)},
        **asdict(own),  # the init's own options
        energy=energy,
    )
    artifacts.write_artifact(config.out, factors, meta)
    return DecomposeSummary(path=Path(config.out), rank=rank, energy=energy, ranks=ranks)


def _check(config: DecomposeConfig) -> tuple[inits.Init, inits.OwnOptions]:
    init = inits.get_init(config.init)
    if init.source == "update" and config.update is None:
        raise BadInputError(f"--init {init.name} factors an update", hint="pass the file lorasb estimate wrote")
    if init.source == "update" and config.model is not None:
        weight_based = ", ".join(i.name for i in inits.INITS.values() if i.source == "model")
        raise BadInputError(
            f"--init {init.name} reads no model", hint=f"drop --model (it is for --init {weight_based})"
        )
    if init.source == "model" and config.model is None and config.update is None:
        raise BadInputError(f"--init {init.name} factors the pretrained weights", hint="pass --model")
    return init, init.resolve_options(config.init_options)


def _update_source(update: artifacts.Artifact) -> _Source:
    meta = update.meta
    modules = [name.removesuffix(".weight") for name in update.names if name not in meta.head]
    shapes = {m: update.shapes()[f"{m}.weight"] for m in modules}
    matrix = functools.partial(_update_matrix, update)
    return _Source(modules, shapes, matrix, meta, meta.base_model, meta.targets)


def _update_matrix(update: artifacts.Artifact, module: str) -> torch.Tensor:
    return artifacts.load_update(update, f"{module}.weight")


def _weight_source(config: DecomposeConfig, init: inits.Init, update: artifacts.Artifact | None) -> _Source:
    """W0 of the model's target modules (float32 on the CPU), and the update's metadata where one is given."""
    meta = update.meta if update is not None else None
    ref = models.resolve_model(config.model or meta.base_model.id)
    files.check_output(config.out, {"model": ref.path})
    spec = models.HeadSpec.from_meta(meta) if meta is not None else None
    base, _ = models.load_model(
        ref,
        dtype=torch.float32,
        device=torch.device("cpu"),
        trust_remote_code=config.trust_remote_code,
        head=models.auto_head(spec),
        labels=spec.labels if spec is not None else None,
    )
    modules = (
        [name.removesuffix(".weight") for name in update.names if name not in meta.head]
        if update is not None
        else models.resolve_targets(base, config.targets)
    )
    shapes = models.target_shapes(base, modules)
    fingerprint = models.fingerprint(shapes)
    if meta is not None and fingerprint != meta.base_model.fingerprint:
        raise IncompatibleArtifactError(
            f"model '{ref.id}' does not have the update's target modules",
            path=update.path,
            hint="pass the model the update was estimated on",
        )
    targets = meta.targets if meta is not None else config.targets
    matrix = functools.partial(_weight_matrix, base)
    return _Source(modules, shapes, matrix, meta, ref.provenance(fingerprint), targets)


def _weight_matrix(base, module: str) -> torch.Tensor:
    return base.get_submodule(module).weight.detach()


def _reference_rank(config: DecomposeConfig, modules: int) -> int:
    """--rank, or with --budget alone the rank it affords in every module (Σ r² = modules × r² ≤ budget)."""
    if config.rank is not None:
        return config.rank
    if config.budget is None:
        ratio = " (--budget-ratio is a fraction of the count at --rank)" if config.budget_ratio is not None else ""
        raise BadInputError(
            f"decompose needs --rank{ratio}", hint="pass --rank R, or --budget N to spend N trainable parameters"
        )
    rank = math.isqrt(max(config.budget, 0) // modules)
    if rank < 1:
        raise BadInputError(
            f"--budget {config.budget:,} is below one parameter in each of the {modules} modules",
            hint=f"pass --budget {modules} or more",
        )
    return rank


def _budget(config: DecomposeConfig, modules: int) -> int | None:
    """The budget in trainable parameters Σ r², or None for --rank everywhere."""
    given = [
        flag
        for flag, value in (("--budget", config.budget), ("--budget-ratio", config.budget_ratio))
        if value is not None
    ]
    if len(given) > 1:
        raise BadInputError("--budget and --budget-ratio both set the budget", hint="pass one of them")
    if not given:
        for flag, value in (("--min-rank", config.min_rank != 1), ("--max-rank", config.max_rank is not None)):
            if value:
                raise BadInputError(f"{flag} applies with a budget only", hint="add --budget or --budget-ratio")
        return None
    value = config.budget if config.budget is not None else config.budget_ratio
    if value <= 0:
        raise BadInputError(f"{given[0]} {value} must be positive")
    if config.min_rank < 1 or (config.max_rank is not None and config.max_rank < config.min_rank):
        raise BadInputError(
            f"--min-rank {config.min_rank} / --max-rank {config.max_rank} must satisfy 1 ≤ min ≤ max",
        )
    uniform = budget.uniform_parameters(config.rank, modules)
    return config.budget if config.budget is not None else round(config.budget_ratio * uniform)


def _ranks(config: DecomposeConfig, source: _Source, progress) -> tuple[dict[str, int], dict | None]:
    """Each module's rank, and the allocation's record for the metadata (None without a budget): --rank
    everywhere, or a budget spent on the modules' spectra (lorasb_cli/budget.py) — one more SVD pass."""
    total = _budget(config, len(source.modules))
    if total is None:
        return {m: config.rank for m in source.modules}, None
    device = models.resolve_device(config.device)
    # No module can take more than what is left once every other one has its least rank.
    affordable = max(config.min_rank, math.isqrt(max(0, total - (len(source.modules) - 1) * config.min_rank**2)))
    max_ranks = {m: min(config.max_rank or 4 * config.rank, affordable, *source.shapes[m]) for m in source.modules}
    energy = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for done, module in enumerate(source.modules, start=1):
            matrix = source.matrix(module).to(device).float()
            s = linalg.truncated_svd(matrix, max_ranks[module], niter=config.niter, exact=config.exact)[1]
            norm = matrix.square().sum()
            energy[module] = (s.square() / norm).cpu() if norm > 0 else torch.zeros_like(s).cpu()
            if progress is not None:
                progress(done, 2 * len(source.modules))
    ranks = budget.allocate_ranks(energy, total, config.min_rank, max_ranks)
    record = {
        "parameters": total,
        "spent": sum(r * r for r in ranks.values()),
        "uniform_rank": config.rank,
        "uniform_parameters": budget.uniform_parameters(config.rank, len(source.modules)),
        "min_rank": config.min_rank,
        "max_rank": max(max_ranks.values()),
    }
    return ranks, record


def _second_half(progress: Callable[[int, int], None], first: int, done: int, total: int) -> None:
    progress(first + done, first + total)


def _factor_all(
    config: DecomposeConfig,
    init: inits.Init,
    settings: inits.InitOptions,
    source: _Source,
    ranks: dict[str, int],
    progress,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """B, R, A of every module at its rank (float32, CPU), and the energy Σσ²(top r) / Σσ² each captures."""
    device = models.resolve_device(config.device)
    factors: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    # Randomized SVDs and random inits draw from the global generator: fork it so a seed fixes the factors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for done, module in enumerate(source.modules, start=1):
            matrix = source.matrix(module).to(device)
            lora_B, lora_R, lora_A, s = (
                t.float().contiguous().cpu() for t in init.factor(matrix, ranks[module], settings)
            )
            total = matrix.float().square().sum().cpu()
            energy[module] = float((s.square().sum() / total).clamp(max=1.0)) if total > 0 else 0.0
            factors |= {f"{module}.lora_B": lora_B, f"{module}.lora_R": lora_R, f"{module}.lora_A": lora_A}
            if progress is not None:
                progress(done, len(source.modules))
    return factors, energy
