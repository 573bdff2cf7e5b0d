"""`lorasb run`: the chain estimate → decompose → train → merge → evaluate into one folder, each stage skipped
when its output is up to date.

Every output lies in the run's folder under a fixed name (`OUTPUTS`); each stage reads the one before it there
(`wired`). `run.json` in the folder records, per stage that finished, the options it ran with, the digests of
its inputs and the digest of its output. A stage is up to date when that record matches what it would run with
now and its output still has the recorded digest; the first stage that is not, and every stage after it, runs.
Digests are of content (artifacts' tensor hashes, a checkpoint's weights digest, a file's sha256), never of paths
or times, so a rerun of an unchanged recipe rewrites no file, and a run killed midway reruns only what is missing.

Under a launcher (torchrun) every process runs this: estimate and train data-parallel, the other stages on
global rank 0 while the others wait at a barrier; rank 0 decides what is up to date and tells the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import BadInputError, LorasbError

log = logging.getLogger("lorasb")

STAGES = ("estimate", "decompose", "train", "merge", "evaluate")
OUTPUTS = {
    "estimate": "update.safetensors",
    "decompose": "factors.safetensors",
    "train": "run",
    "merge": "merged",
    "evaluate": "results.json",
}
DATA_PARALLEL = ("estimate", "train")  # under a launcher every process runs these; rank 0 alone the others
MANIFEST = "run.json"
MANIFEST_FORMAT = "lorasb-run"
# Config fields that name what a stage reads: their content digests are part of its record.
INPUT_FIELDS = ("model", "data", "eval_data", "update", "factors", "init_adapter", "adapter", "template_of")

Progress = Callable[[str], contextlib.AbstractContextManager[Callable[[int, int], None]]]


@dataclasses.dataclass
class StageRun:
    stage: str
    path: Path
    skipped: bool
    seconds: float


def wired(stage: str, out: Path) -> dict[str, object]:
    """The options the chain sets for `stage`: its -o in `out`, the previous stage's output as its input, and
    permission to replace its own earlier output (the run owns the folder)."""
    paths = {name: str(out / file) for name, file in OUTPUTS.items()}
    return {
        "estimate": {"out": paths["estimate"]},
        "decompose": {"update": paths["estimate"], "out": paths["decompose"]},
        "train": {"factors": paths["decompose"], "out": paths["train"], "overwrite": True},
        "merge": {"adapter": paths["train"], "out": paths["merge"], "overwrite": True},
        "evaluate": {"model": paths["merge"], "out": paths["evaluate"]},
    }[stage]


def parse_stages(stages: str | list | None) -> tuple[str, ...]:
    """The stages to run, in chain order, from a comma list or YAML list (all five when None)."""
    if stages is None:
        return STAGES
    names = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else [str(s) for s in stages]
    for name in names:
        if name not in STAGES:
            closest = difflib.get_close_matches(name, STAGES, n=1)
            raise BadInputError(
                f"no stage '{name}' in the chain",
                hint=f"did you mean '{closest[0]}'?" if closest else f"stages are {', '.join(STAGES)}",
            )
    return tuple(s for s in STAGES if s in names)


def run(out: Path, configs: Mapping[str, object], progress: Progress) -> list[StageRun]:
    """Run the stages of `configs` ({stage: its config, wired into `out`}, in chain order) that are not up to
    date; returns what each did. Rank 0 records each finished stage in `out/run.json` at once, so a killed run
    keeps the records of the stages it finished."""
    from . import system

    rank, world = system.launcher_rank()
    if world > 1:
        system.init_distributed()
    manifest = _read_manifest(out)
    first = system.broadcast_from_main(_first_stale(out, configs, manifest) if rank == 0 else None)
    stages = list(configs.items())
    # After the last data-parallel stage that runs, the other processes have nothing left to do: the job's group is
    # left there, so rank 0's merge and evaluate (often longer than a collective's timeout) wait on no one.
    parallel = [i for i, (stage, _) in enumerate(stages) if i >= first and stage in DATA_PARALLEL]
    last_parallel = parallel[-1] if parallel else None
    leave_before = first if last_parallel is None else None
    runs = []
    for index, (stage, config) in enumerate(stages):
        if index == leave_before:
            system.leave_distributed()
            if rank > 0:
                break
        path = out / OUTPUTS[stage]
        if index < first:
            log.info("%s: up to date, skipped", stage)
            runs.append(StageRun(stage, path, skipped=True, seconds=0.0))
            continue
        started = time.perf_counter()
        if stage in DATA_PARALLEL or rank == 0:
            with progress(stage) as bar:
                _stage_function(stage)(config, bar)
        if rank == 0:
            manifest["stages"][stage] = _record(out, stage, config)
            _write_manifest(out, manifest)
        system.barrier()  # the next stage reads this one's output, which rank 0 wrote
        runs.append(StageRun(stage, path, skipped=False, seconds=time.perf_counter() - started))
        log.info("%s: done in %.1f s → %s", stage, runs[-1].seconds, path)
        if index == last_parallel:
            system.leave_distributed()
            if rank > 0:
                break
    return runs


def _first_stale(out: Path, configs: Mapping[str, object], manifest: dict) -> int:
    """The index of the first stage in `configs` that is not up to date (len(configs) when all are)."""
    for index, (stage, config) in enumerate(configs.items()):
        recorded = manifest["stages"].get(stage)
        if recorded is None or recorded != _record(out, stage, config):
            return index
    return len(configs)


def _record(out: Path, stage: str, config) -> dict:
    """What a stage ran with and made: its options (as JSON, less those the chain wires), its inputs' digests
    and its output's digest (None while it does not exist)."""
    chain = wired(stage, out)
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in chain}
    inputs = {
        name: _input_digest(name, value)
        for name in INPUT_FIELDS
        if isinstance(value := getattr(config, name, None), str)
    }
    return {
        "options": json.loads(json.dumps(options, sort_keys=True, default=str)),
        "inputs": inputs,
        "output": digest(out / OUTPUTS[stage]),
    }


def _input_digest(name: str, value: str) -> str | None:
    """A local file or folder's content digest; a model alias or hub id's cached weights digest; None otherwise
    (a built-in or hub data set: its name and options are in the record)."""
    if Path(value).expanduser().exists():
        return digest(Path(value).expanduser())
    if name == "model":
        from . import models

        with contextlib.suppress(LorasbError, OSError, ValueError):
            return models.weights_digest(models.resolve_model(value))
    return None


def digest(path: Path) -> str | None:
    """A short digest of what `path` holds, from the hashes lorasb records where it has them: an artifact's tensor
    hashes (`content_digest`), a run folder's adapter's, a checkpoint folder's weights digest, else the file's
    sha256. None where it is missing or unreadable (then the stage that makes it runs again)."""
    from . import artifacts, files, models

    try:
        if path.is_dir():
            if (path / "adapter.safetensors").is_file():
                return digest(path / "adapter.safetensors")
            return models.weights_digest(models.resolve_model(str(path)))
        if not path.is_file():
            return None
        if path.suffix == ".safetensors":
            return artifacts.Artifact(path).meta.content_digest()
        return files.file_sha256(path)[:16]
    except (LorasbError, OSError):
        return None


def _read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    empty = {"format": MANIFEST_FORMAT, "stages": {}}
    if not path.is_file():
        return empty
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("%s is unreadable: every stage runs again", path)
        return empty
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise BadInputError(
            "the run folder holds a run.json lorasb run did not write", path=str(path), hint="pick another out:"
        )
    return manifest if isinstance(manifest.get("stages"), dict) else empty


def _write_manifest(out: Path, manifest: dict) -> None:
    from .files import atomic_path

    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _stage_function(stage: str):
    """The stage's plain function: each stage module has one of its own name (estimate.estimate, ...)."""
    import importlib

    return getattr(importlib.import_module(f".{stage}", __package__), stage)
