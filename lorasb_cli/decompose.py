"""`lorasb decompose`: one matrix per target module → B [m, r], R [r, r], A [r, n] by the init `--init`
(lorasb_cli/inits). The default, `lorasb`, is the truncated SVD of ΔW_avg ≈ U S Vᵀ: B = U_r, R = diag(S_r),
A = V_rᵀ; B and A are orthonormal and η scales R only. The randomized SVD must stay within 1% of the
Eckart–Young optimum ‖ΔW − trunc_r(ΔW)‖_F (DESIGN.md §4); `exact` runs the full SVD.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from . import artifacts, inits, linalg, models
from .errors import BadInputError, IncompatibleArtifactError
from .options import PluginConfig, argument, option


@dataclass
class DecomposeSummary:
    path: Path
    rank: int
    energy: dict[str, float] = field(default_factory=dict)

    def energy_by_kind(self) -> list[tuple[str, int, float, float, float]]:
        """(module kind with layer numbers as *, count, mean, min, max) of the captured energy."""
        groups: dict[str, list[float]] = {}
        for module, value in self.energy.items():
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", module), []).append(value)
        return [(k, len(v), sum(v) / len(v), min(v), max(v)) for k, v in groups.items()]


@dataclass(frozen=True, kw_only=True)
class DecomposeConfig(PluginConfig):
    """`lorasb decompose`'s options. The init's own options (--noise-std, ...) are declared by the init
    (lorasb_cli/inits) and arrive in `init_options` as given; `from_options` builds a config from flat options."""

    update: str | None = argument(required=False)
    rank: int = option("--rank", "-r", type=int, required=True, help="Rank r of B (m×r), R (r×r), A (r×n).")
    init: str = option(
        default="lorasb", metavar="NAME", help="lorasb, lora-xs (SVD of W0), kaiming, noisy, non-orthonormal."
    )
    model: str | None = option("--model", "-m", help="A weight-based init (lora-xs): the model whose W0 is factored.")
    targets: str = option(default="all-linear", help="A weight-based init without an update: the modules.")
    niter: int = option(default=linalg.DEFAULT_NITER, help="Power iterations of the randomized SVD.")
    exact: bool = option(flag=True, default=False, help="Full SVD instead of torch.svd_lowrank (slower).")
    seed: int = option(default=0, help="Seed of the randomized SVD and random inits.")
    device: str = option(default="auto", help="Where to run the SVDs: auto, cpu, cuda.")
    trust_remote_code: bool = option(flag=True, default=False, help="Allow the model's own code (weight-based inits).")
    out: str = option("-o", "--out", default="factors.safetensors", help="Factors file to write.")
    init_options: Mapping[str, object] = field(default_factory=dict)

    PLUGIN_FIELD: ClassVar[str] = "init_options"

    @staticmethod
    def plugin_fields() -> list:
        return inits.option_fields()


@dataclass
class _Source:
    """The matrices an init factors, one per target module, and the metadata the factors file inherits."""

    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    matrix: Callable[[str], torch.Tensor]
    meta: dict
    head: list[str]  # a classifier's head tensors: carried over as they are, not factored


def decompose(config: DecomposeConfig, progress: Callable[[int, int], None] | None = None) -> DecomposeSummary:
    """Factor one matrix per target module with the init `config.init` and write `<module>.lora_{B,R,A}`.

    The matrix is ΔW_avg from the update at `config.update`, or W0 of `config.model` for a weight-based init
    (`lora-xs`); such an init takes its modules, classifier head and labels from the update when one is
    given (so it starts from the same head as LoRA-SB), else from the model and `config.targets`.
    """
    init, own = _check(config)
    artifacts.check_output(config.out, {"update": config.update})
    update = artifacts.Artifact(config.update, kinds=("update",)) if config.update is not None else None
    source = _weight_source(config, init, update) if init.source == "model" else _update_source(update)
    linalg.check_rank(config.rank, source.shapes, update.path if update is not None else None)
    settings = inits.InitOptions(niter=config.niter, exact=config.exact, eta=source.meta.get("eta"), own=own)
    factors, energy = _factor_all(config, init, settings, source, progress)
    factors |= {name: update.get(name) for name in source.head}
    meta = source.meta
    provenance = artifacts.provenance(
        "factors",
        base_model=meta["base_model"],
        targets=meta["targets"],
        method="lorasb",
        init=config.init,
        rank=config.rank,
        scale=init.scale,
        eta=meta.get("eta"),
        data=meta.get("data"),
        samples=meta.get("samples"),
        seed=config.seed,
        svd={"exact": config.exact, "niter": config.niter, "oversampling": linalg.oversampling(config.rank)},
        **asdict(own),
        energy=energy,
        **models.head_meta(models.HeadSpec.from_meta(meta)),
    )
    artifacts.write_artifact(config.out, factors, provenance)
    return DecomposeSummary(path=Path(config.out), rank=config.rank, energy=energy)


def _check(config: DecomposeConfig) -> tuple[inits.Init, inits.OwnOptions]:
    init = inits.get_init(config.init)
    if config.niter < 0:
        raise BadInputError(f"--niter {config.niter} must be ≥ 0")
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
    meta = dict(update.meta)
    head = meta.get("head", [])
    modules = [name.removesuffix(".weight") for name in update.names if name not in head]
    shapes = {m: update.shapes()[f"{m}.weight"] for m in modules}
    return _Source(modules, shapes, lambda m: artifacts.load_update(update, f"{m}.weight"), meta, head)


def _weight_source(config: DecomposeConfig, init: inits.Init, update: artifacts.Artifact | None) -> _Source:
    """W0 of the model's target modules (float32 on the CPU), and the update's metadata where one is given."""
    meta = dict(update.meta) if update is not None else {}
    head = meta.get("head", [])
    ref = models.resolve_model(config.model or update.meta["base_model"]["id"])
    artifacts.check_output(config.out, {"model": ref.path})
    spec = models.HeadSpec.from_meta(meta)
    base, _ = models.load_model(
        ref,
        dtype=torch.float32,
        device=torch.device("cpu"),
        trust_remote_code=config.trust_remote_code,
        head=models.auto_head(spec),
        labels=spec.labels if spec is not None else None,
    )
    modules = (
        [name.removesuffix(".weight") for name in update.names if name not in head]
        if update is not None
        else models.resolve_targets(base, config.targets)
    )
    shapes = models.target_shapes(base, modules)
    fingerprint = models.fingerprint(shapes)
    if update is not None and fingerprint != update.meta["base_model"]["fingerprint"]:
        raise IncompatibleArtifactError(
            f"model '{ref.id}' does not have the update's target modules",
            path=update.path,
            hint="pass the model the update was estimated on",
        )
    meta |= {"base_model": ref.provenance(fingerprint), "targets": meta.get("targets", config.targets)}
    return _Source(modules, shapes, lambda m: base.get_submodule(m).weight.detach(), meta, head)


def _factor_all(
    config: DecomposeConfig, init: inits.Init, settings: inits.InitOptions, source: _Source, progress
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """B, R, A of every module (float32, CPU), and the energy Σσ²(top r) / Σσ² each captures."""
    device = models.resolve_device(config.device)
    factors: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    # Randomized SVDs and random inits draw from the global generator: fork it so a seed fixes the factors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for done, module in enumerate(source.modules, start=1):
            matrix = source.matrix(module).to(device)
            lora_B, lora_R, lora_A, s = (
                t.float().contiguous().cpu() for t in init.factor(matrix, config.rank, settings)
            )
            total = matrix.float().square().sum().cpu()
            energy[module] = float((s.square().sum() / total).clamp(max=1.0)) if total > 0 else 0.0
            factors |= {f"{module}.lora_B": lora_B, f"{module}.lora_R": lora_R, f"{module}.lora_A": lora_A}
            if progress is not None:
                progress(done, len(source.modules))
    return factors, energy
