"""`lorasb inspect`: what a lorasb artifact is — kind, provenance, modules, shapes, rank, parameter counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import adapter, artifacts, shards
from .adapter import MAGNITUDE
from .errors import BadInputError


def describe(path: str | os.PathLike) -> dict:
    """A JSON-able description of an update/factors/adapter file, an adapter run directory, a PEFT export
    or a merged model directory."""
    target = Path(path)
    if not target.exists():
        raise BadInputError("no such file or directory", path=str(target))
    if target.is_dir():
        if (target / adapter.ADAPTER_FILE).is_file():
            return describe_file(target / adapter.ADAPTER_FILE)
        if (target / "adapter_model.safetensors").is_file():
            return _describe_peft(target)
        if (target / "config.json").is_file():
            return _describe_model(target)
        raise BadInputError(
            "directory holds no lorasb artifact", path=str(target),
            hint="pass an update/factors file, a train -o directory or a merge -o directory",
        )  # fmt: skip
    return describe_file(target)


def describe_file(path: Path) -> dict:
    artifact = artifacts.Artifact(path)
    shapes = artifact.shapes()
    modules: dict[str, dict] = {}
    if artifact.kind in ("update", "update-raw"):
        for name, shape in shapes.items():
            modules[name.removesuffix(".weight")] = {"shape": list(shape)}
        counts = {"update_entries": sum(s[0] * s[1] for s in shapes.values())}
    else:
        trainable = lora_same_rank = 0
        for module in artifacts.factor_modules(artifact):
            (m, r), (_, n) = shapes[f"{module}.lora_B"], shapes[f"{module}.lora_A"]
            modules[module] = {"shape": [m, n], "rank": r}
            trainable += r * r
            lora_same_rank += r * (m + n)
        extra = [n for n in artifact.names if n.rsplit(".", 1)[-1] not in (*artifacts.FACTOR_SUFFIXES, MAGNITUDE)]
        full = sum(_numel(shapes[n]) for n in extra)
        if artifact.meta.get("method", "lorasb") == "lorasb":
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
        "provenance": artifact.meta,
        "shapes": modules,
    }


def _describe_peft(directory: Path) -> dict:
    config = json.loads((directory / "adapter_config.json").read_text())
    header = shards.read_header(directory / "adapter_model.safetensors")
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
    first = shards.read_header(directory / index.shard_files()[0]).get("__metadata__", {})
    provenance = json.loads(first["lorasb"]) if "lorasb" in first else {}
    return {
        "path": str(directory),
        "kind": "merged-model" if provenance else "model",
        "modules": len(index),
        "rank": None,
        "parameters": {"total": sum(_numel(index.shape(n)) for n in index.names())},
        "provenance": provenance or json.loads((directory / "config.json").read_text()),
        "shapes": {},
    }


def _numel(shape) -> int:
    count = 1
    for d in shape:
        count *= d
    return count
