"""`lorasb decompose`: one matrix per target module → B [m, r], R [r, r], A [r, n] by the init `--init`
(lorasb_cli/inits). The default, `lorasb`, is the truncated SVD of ΔW_avg ≈ U S Vᵀ: B = U_r, R = diag(S_r),
A = V_rᵀ; B and A are orthonormal and η scales R only. The randomized SVD must stay within 1% of the
Eckart–Young optimum ‖ΔW − trunc_r(ΔW)‖_F (DESIGN.md §4); `exact` runs the full SVD.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import artifacts, inits, linalg, models
from .errors import BadInputError, IncompatibleArtifactError


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


def decompose(
    update_path: str | None,
    rank: int,
    out: str,
    *,
    init: str = "lorasb",
    model: str | None = None,
    targets: str = "all-linear",
    noise_std: float | None = None,
    niter: int = linalg.DEFAULT_NITER,
    exact: bool = False,
    seed: int = 0,
    device: str = "auto",
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DecomposeSummary:
    """Factor one matrix per target module with the init `init` and write `<module>.lora_{B,R,A}` to `out`.

    The matrix is ΔW_avg from the update at `update_path`, or W0 of `model` for a weight-based init
    (`lora-xs`); such an init takes its modules, classifier head and labels from the update when one is
    given (so it starts from the same head as LoRA-SB), else from `model` and `targets`.
    """
    method = inits.get_init(init)
    if niter < 0:
        raise BadInputError(f"--niter {niter} must be ≥ 0")
    if method.source == "update" and update_path is None:
        raise BadInputError(f"--init {init} factors an update", hint="pass the file lorasb estimate wrote")
    if method.source == "update" and model is not None:
        raise BadInputError(f"--init {init} reads no model", hint="drop --model (it is for --init lora-xs)")
    if init == "noisy" and (noise_std is None or noise_std < 0):
        raise BadInputError("--init noisy needs --noise-std σ ≥ 0", hint="e.g. --noise-std 1 (in units of η)")
    artifacts.check_output(out, {"update": update_path})
    update = artifacts.Artifact(update_path, kinds=("update",)) if update_path is not None else None
    meta = dict(update.meta) if update is not None else {}
    head = meta.get("head", [])  # a classifier's head: carried over as is, not factored
    options = inits.InitOptions(niter=niter, exact=exact, eta=meta.get("eta"), noise_std=noise_std)
    target_device = models.resolve_device(device)

    if method.source == "model":
        if model is None and update is None:
            raise BadInputError(f"--init {init} factors the pretrained weights", hint="pass --model")
        ref = models.resolve_model(model or update.meta["base_model"]["id"])
        artifacts.check_output(out, {"model": ref.path})
        spec = models.HeadSpec.from_meta(meta)
        base, _ = models.load_model(
            ref,
            dtype=torch.float32,
            device=torch.device("cpu"),
            trust_remote_code=trust_remote_code,
            head=models.auto_head(spec),
            labels=spec.labels if spec is not None else None,
        )
        modules = (
            [name.removesuffix(".weight") for name in update.names if name not in head]
            if update is not None
            else models.resolve_targets(base, targets)
        )
        shapes = models.target_shapes(base, modules)
        fingerprint = models.fingerprint(shapes)
        if update is not None and fingerprint != update.meta["base_model"]["fingerprint"]:
            raise IncompatibleArtifactError(
                f"model '{ref.id}' does not have the update's target modules",
                path=update.path,
                hint="pass the model the update was estimated on",
            )
        meta |= {"base_model": ref.provenance(fingerprint), "targets": meta.get("targets", targets)}

        def matrix(module: str) -> torch.Tensor:
            return base.get_submodule(module).weight.detach()
    else:
        modules = [name.removesuffix(".weight") for name in update.names if name not in head]
        shapes = {m: update.shapes()[f"{m}.weight"] for m in modules}

        def matrix(module: str) -> torch.Tensor:
            return artifacts.load_update(update, f"{module}.weight")

    linalg.check_rank(rank, shapes, update.path if update is not None else None)
    factors: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    # Randomized SVDs and random inits draw from the global generator: fork it so a seed fixes the factors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for done, module in enumerate(modules, start=1):
            source = matrix(module).to(target_device)
            lora_B, lora_R, lora_A, s = (t.float().contiguous().cpu() for t in method.factor(source, rank, options))
            total = source.float().square().sum().cpu()
            energy[module] = float((s.square().sum() / total).clamp(max=1.0)) if total > 0 else 0.0
            factors |= {f"{module}.lora_B": lora_B, f"{module}.lora_R": lora_R, f"{module}.lora_A": lora_A}
            if progress is not None:
                progress(done, len(modules))
    factors |= {name: update.get(name) for name in head}

    provenance = artifacts.provenance(
        "factors",
        base_model=meta["base_model"],
        targets=meta["targets"],
        method="lorasb",
        init=init,
        rank=rank,
        scale=method.scale,
        eta=meta.get("eta"),
        data=meta.get("data"),
        samples=meta.get("samples"),
        seed=seed,
        svd={"exact": exact, "niter": niter, "oversampling": linalg.oversampling(rank)},
        **({"noise_std": noise_std} if init == "noisy" else {}),
        energy=energy,
        **models.head_meta(models.HeadSpec.from_meta(meta)),
    )
    artifacts.write_artifact(out, factors, provenance)
    return DecomposeSummary(path=Path(out), rank=rank, energy=energy)
