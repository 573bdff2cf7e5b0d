"""`lorasb inspect`: what a lorasb artifact is — kind, provenance, modules, shapes, rank, parameter counts — and,
with `--verify`, whether its tensors are still those it was written with."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import adapter, artifacts, files, metadata, methods, shards
from .errors import BadInputError

PEFT_FILE = "adapter_model.safetensors"


def describe(path: str | os.PathLike) -> dict:
    """A JSON-able description of an update/factors/adapter file, an adapter run directory, a PEFT export
    or a merged model directory."""
    kind, target = _resolve(path)
    with artifacts.unverified_allowed():  # inspect shows any artifact; `verify` says what stands unverified
        return {"artifact": describe_file, "peft": _describe_peft, "model": _describe_model}[kind](target)


def verify(path: str | os.PathLike) -> dict:
    """Read every tensor of what `describe` accepts and check it against the hash recorded when it was written.

    Raises IncompatibleArtifactError naming the file and tensor at the first mismatch. Returns the counts and a
    status: `ok`, `no hashes recorded` (written before lorasb recorded them) or `partly hashed`."""
    kind, target = _resolve(path)
    if kind == "artifact":
        with artifacts.unverified_allowed():
            artifact = artifacts.Artifact(target)
        verified, total, what = artifact.verify(), len(artifact.names), artifact.kind
    elif kind == "peft":
        verified, total = shards.verify_file(target / PEFT_FILE)
        what = "peft-lora"
    else:
        index = shards.CheckpointIndex(target)
        verified, total = index.verify(), len(index)
        what = "model"
    status = "ok" if verified == total else "no hashes recorded" if verified == 0 else "partly hashed"
    return {"path": str(target), "kind": what, "tensors": total, "verified": verified, "status": status}


def _resolve(path: str | os.PathLike) -> tuple[str, Path]:
    """What `path` is — `artifact` (a lorasb safetensors file), `peft` or `model` (a directory) — and the file
    or directory to read."""
    target = Path(path)
    if not target.exists():
        raise BadInputError("no such file or directory", path=str(target))
    if target.is_dir():
        if (target / adapter.ADAPTER_FILE).is_file():
            return "artifact", target / adapter.ADAPTER_FILE
        if (target / PEFT_FILE).is_file():
            return "peft", target
        if (target / "config.json").is_file():
            return "model", target
        raise BadInputError(
            "directory holds no lorasb artifact",
            path=str(target),
            hint="pass an update/factors file, a train -o directory or a merge -o directory",
        )
    return "artifact", target


def describe_file(path: Path) -> dict:
    artifact = artifacts.Artifact(path)
    shapes = artifact.shapes()
    modules: dict[str, dict] = {}
    if artifact.kind in ("update", "update-raw"):
        # A classifier's update also carries the head G was computed through (1-D biases among them).
        head = set(artifact.meta.head)
        for name, shape in shapes.items():
            if name not in head:
                modules[name.removesuffix(".weight")] = {"shape": list(shape)}
        counts = {"update_entries": sum(_numel(s) for n, s in shapes.items() if n not in head)}
        if head:
            counts["head"] = sum(_numel(shapes[n]) for n in head)
    else:
        trainable = lora_same_rank = 0
        factor_modules = artifacts.factor_modules(artifact)
        for module in factor_modules:
            (m, r), (_, n) = shapes[f"{module}.lora_B"], shapes[f"{module}.lora_A"]
            modules[module] = {"shape": [m, n], "rank": r}
            trainable += r * r
            lora_same_rank += r * (m + n)
        full = sum(_numel(shapes[n]) for n in artifact.names if not _of_layer(n, factor_modules))
        if _trains_r_only(artifact):
            counts = {"trainable_R": trainable, "trainable_head": full, "lora_same_rank": lora_same_rank}
        else:  # other methods store their result as B, R, A (and full tensors), not what they trained
            counts = {"stored": sum(_numel(s) for s in shapes.values()), "full_tensors": full}
    ranks = sorted({m["rank"] for m in modules.values() if "rank" in m})
    return {
        "path": str(path),
        "kind": artifact.kind,
        "modules": len(modules),
        "rank": ranks[0] if len(ranks) == 1 else ranks or None,
        "parameters": counts,
        "provenance": artifact.fields,
        "shapes": modules,
    }


def _of_layer(name: str, modules) -> bool:
    """Whether tensor `name` belongs to an adapted layer (its B, R, A or a layer variant's own tensor) rather than
    being a full tensor (a head, a full fine-tune's weight)."""
    return name.rpartition(".")[2] in artifacts.FACTOR_SUFFIXES or adapter.is_module_tensor(name, modules)


def _trains_r_only(artifact: artifacts.Artifact) -> bool:
    """Whether what the file holds was trained as R only, between fixed B and A: a factors file, or an adapter of a
    method that trains between a factors file's B, A. Other methods store their result as B, R, A, not what they
    trained."""
    recorded = artifact.meta.method
    return recorded is None or (recorded in methods.METHODS and methods.METHODS[recorded].needs_factors)


def _describe_peft(directory: Path) -> dict:
    config = _read_json(directory / "adapter_config.json")
    header = shards.read_header(directory / PEFT_FILE)
    header.pop("__metadata__", None)
    return {
        "path": str(directory),
        "kind": "peft-lora",
        "modules": sum(1 for n in header if n.endswith("lora_A.weight")),
        "rank": config.get("r"),
        "parameters": {"lora": sum(_numel(e["shape"]) for e in header.values())},
        "provenance": config,
        "shapes": {},
    }


def _describe_model(directory: Path) -> dict:
    index = shards.CheckpointIndex(directory)
    first = shards.read_header(directory / index.shard_files()[0]).get("__metadata__") or {}
    provenance = _merged_provenance(first.get(artifacts.METADATA_KEY), directory / index.shard_files()[0])
    return {
        "path": str(directory),
        "kind": "merged-model" if provenance else "model",
        "modules": len(index),
        "rank": None,
        "parameters": {"total": sum(_numel(index.shape(n)) for n in index.names())},
        "provenance": provenance or _read_json(directory / "config.json"),
        "shapes": {},
    }


def _merged_provenance(text: object, shard: Path) -> dict:
    """A merged checkpoint's `lorasb` metadata ({} if none), under the artifact reader's size and depth limits."""
    return {} if text is None else artifacts.parse_metadata(text, str(shard))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"unreadable JSON file ({e})", path=str(path), hint="copy the directory again") from None
    if not isinstance(value, dict):
        raise BadInputError("JSON file holds no object", path=str(path), hint="copy the directory again")
    return value


def _numel(shape) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


PLOT_MAX_RANK = 256  # the spectra drawn: the top 256 singular values of each module at most


def plot_update(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """`inspect --plot`: the captured energy Σ_{i≤r} σ_i² / ‖ΔW‖²_F against r per module kind (mean over its
    layers) of an update, and, where the update records them, the stability of its estimate: the halves' overlap
    against r (--report-ranks) and successive estimates' overlap against samples (--samples auto)."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from . import linalg

    kind, target = _resolve(path)
    files.check_output(out, {"update": target})
    artifact = artifacts.Artifact(target) if kind == "artifact" else None
    if artifact is None or artifact.kind != "update":
        raise BadInputError("--plot draws an update's spectra", path=str(target), hint="pass a lorasb estimate file")
    curves: dict[str, list[torch.Tensor]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for module in artifacts.update_modules(artifact):
            signs = artifact.get(f"{module}.weight").float()
            s = linalg.truncated_svd(signs, min(PLOT_MAX_RANK, *signs.shape))[1]
            curves.setdefault(re.sub(r"\.\d+\.", ".*.", module), []).append(s.square().cumsum(0) / signs.square().sum())
    meta = artifact.meta
    panels = 1 + bool(meta.stability) + bool(meta.samples_auto)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), dpi=120, squeeze=False)
    energy = axes[0][0]
    for name, values in curves.items():
        length = min(len(v) for v in values)
        mean = torch.stack([v[:length] for v in values]).mean(0)
        energy.plot(range(1, length + 1), mean.tolist(), label=f"{name} ({len(values)})", lw=1.2)
    energy.set(xlabel="rank r", ylabel="captured energy Σσ²(top r) / Σσ²", title="spectrum of the sign update")
    energy.grid(alpha=0.3)
    energy.legend(fontsize=6)
    _plot_stability(axes[0][1:], meta)
    files.write_figure(fig, out)
    return Path(out)


def _plot_stability(axes, meta: metadata.UpdateMeta) -> None:
    """The stability panels of plot_update, in the order its axes come."""
    from .stability import by_kind

    axes = list(axes)
    if meta.stability:
        ax = axes.pop(0)
        rows = by_kind(meta.stability)
        for name in dict.fromkeys(row[0] for row in rows):
            own = [row for row in rows if row[0] == name]
            line = ax.plot([r[1] for r in own], [r[2] for r in own], "o-", label=name, lw=1.2)[0]
            ax.plot([r[1] for r in own], [r[4] for r in own], ":", color=line.get_color(), lw=1)
        halves = meta.stability.get("samples", [])
        _overlap_axes(
            ax, "rank r", "overlap of the halves' top-r subspaces", f"halves of {sum(halves)} samples (dotted: random)"
        )
        ax.legend(fontsize=6)
    if meta.samples_auto:
        ax, auto = axes.pop(0), meta.samples_auto
        points = [p for p in auto["curve"] if p["overlap"] is not None]
        ax.plot([p["samples"] for p in points], [p["overlap"] for p in points], "o-")
        ax.axhline(auto["threshold"], ls="--", color="gray", lw=1)
        ax.set_xscale("log", base=2)
        _overlap_axes(
            ax, "samples", "the previous estimate", f"--samples auto at r = {auto['rank']}: {auto['samples']}"
        )


def _overlap_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
