"""The experiment trackers of `lorasb train --report-to` (the Trainer's `report_to` integrations): which there are,
whether one is installed (checked before any weight loads), where each writes, and the run's record (its options
and provenance) in each tracker's config beside the Trainer's own logs.

Imports no torch or transformers at module level: the CLI's options read REPORT_TO.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError

LOGS_DIR = "logs"  # in the run folder: where a tracker writes unless its own environment variables say otherwise


@dataclass(frozen=True)
class Tracker:
    """One tracker: the `module` that must import, the pip command that installs it, the folder of the run's
    LOGS_DIR it writes into, and `env(logs)`: the environment variables that point it there."""

    module: str
    install: str
    folder: str
    env: Callable[[Path], dict[str, str]]


TRACKERS = {
    "tensorboard": Tracker(
        "tensorboard",
        "pip install 'lorasb[tracking]'",
        "tensorboard",
        lambda logs: {"TENSORBOARD_LOGGING_DIR": str(logs / "tensorboard")},
    ),
    "wandb": Tracker(  # W&B writes into WANDB_DIR/wandb
        "wandb", "pip install wandb", "wandb", lambda logs: {"WANDB_DIR": str(logs), "WANDB_PROJECT": "lorasb"}
    ),
    "mlflow": Tracker(
        "mlflow",
        "pip install mlflow",
        "mlruns",
        lambda logs: {"MLFLOW_TRACKING_URI": (logs / "mlruns").as_uri(), "MLFLOW_EXPERIMENT_NAME": "lorasb"},
    ),
}
REPORT_TO = ("none", *TRACKERS, "all")
# What the trackers leave in a run folder: it marks the folder as a run that --overwrite may replace.
RUN_MARKS = tuple(f"{LOGS_DIR}/{tracker.folder}" for tracker in TRACKERS.values())


def _installed(tracker: Tracker) -> bool:
    try:
        importlib.import_module(tracker.module)
    except ImportError:
        return False
    return True


def report_to(choice: str) -> list[str]:
    """The Trainer's `report_to` for `--report-to choice`: [] for none; for all, each tracker that is installed.
    A tracker asked for that does not import is a one-line error naming its pip command."""
    if choice == "none":
        return []
    if choice == "all":
        found = [name for name, tracker in TRACKERS.items() if _installed(tracker)]
        if not found:
            raise BadInputError(
                f"--report-to all: none of {', '.join(TRACKERS)} is installed",
                hint=" or ".join(t.install for t in TRACKERS.values()),
            )
        return found
    tracker = TRACKERS[choice]
    if not _installed(tracker):
        raise BadInputError(f"--report-to {choice}: {tracker.module} is not installed", hint=tracker.install)
    return [choice]


@contextlib.contextmanager
def logs_in(run: Path, trackers: Sequence[str]) -> Iterator[None]:
    """Point each of `trackers` at `run`/LOGS_DIR through its environment variables, each only where it is unset
    (a user's own setting wins), while the block runs: the Trainer's integrations read them when they start."""
    wanted: dict[str, str] = {}
    for name in trackers:
        wanted |= TRACKERS[name].env(run / LOGS_DIR)
    added = {key: value for key, value in wanted.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def hparams(record: dict) -> dict[str, int | float | str | bool]:
    """The run's options flat, as a tracker's parameters: the train options, the method, rank and lorasb version;
    a value that is not a number, string or bool as JSON."""
    flat = {
        **record.get("train", {}),
        "method": record.get("method"),
        "rank": record.get("rank"),
        "lorasb_version": (record.get("versions") or {}).get("lorasb"),
    }
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat.items()}


def record_run(trackers: Sequence[str], record: dict, callbacks: Sequence[object]) -> None:
    """Put the run's `record` (the adapter's provenance: options, base model, data, versions) into each tracker's
    config, once the Trainer's integration (one of `callbacks`) has started: TensorBoard a `lorasb` text and the
    HParams of the run, W&B its run config, MLflow parameters `lorasb.*` and the artifact lorasb.json."""
    flat = hparams(record)
    if "tensorboard" in trackers:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries
        from transformers.integrations import TensorBoardCallback

        for callback in callbacks:
            writer = callback.tb_writer if isinstance(callback, TensorBoardCallback) else None
            if writer is not None:
                writer.add_text("lorasb", f"```json\n{json.dumps(record, indent=2)}\n```")  # markdown: a code block
                # The HParams dashboard lists the run with its train/loss scalars beside these values.
                for summary in hparams_summaries(flat, {"train/loss": 0.0}):
                    writer.file_writer.add_summary(summary)
                writer.flush()
    if "wandb" in trackers:
        import wandb

        if wandb.run is not None:
            wandb.run.config.update({"lorasb": record}, allow_val_change=True)
    if "mlflow" in trackers:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_params({f"lorasb.{k}": v for k, v in flat.items()})
            mlflow.log_dict(record, "lorasb.json")
