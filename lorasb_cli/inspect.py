"""`lorasb inspect`: what a lorasb artifact is — kind, provenance, modules, shapes, rank, parameter counts — and,
with `--verify`, whether its tensors are still those it was written with."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import adapter, artifacts, shards
from .adapter import MAGNITUDE
from .errors import BadInputError

PEFT_FILE = "adapter_model.safetensors"


def describe(path: str | os.PathLike) -> dict:
    """A JSON-able description of an update/factors/adapter file, an adapter run directory, a PEFT export
    or a merged model directory."""
    kind, target = _resolve(path)
    return {"artifact": describe_file, "peft": _describe_peft, "model": _describe_model}[kind](target)


def verify(path: str | os.PathLike) -> dict:
    """Read every tensor of what `describe` accepts and check it against the hash recorded when it was written.

    Raises IncompatibleArtifactError naming the file and tensor at the first mismatch. Returns the counts and a
    status: `ok`, `no hashes recorded` (written before lorasb recorded them) or `partly hashed`."""
    kind, target = _resolve(path)
    if kind == "artifact":
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
        head = set(artifact.provenance.head)
        for name, shape in shapes.items():
            if name not in head:
                modules[name.removesuffix(".weight")] = {"shape": list(shape)}
        counts = {"update_entries": sum(_numel(s) for n, s in shapes.items() if n not in head)}
        if head:
            counts["head"] = sum(_numel(shapes[n]) for n in head)
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
