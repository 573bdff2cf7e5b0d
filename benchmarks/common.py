"""Helpers the benchmark scripts share: machine facts, timing, markdown tables and the results folder."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorasb_cli.loss import per_sample_loss_sum

# The repository root: the working directory of every `python -m benchmarks.NAME` child a script starts.
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# Mistral-7B-v0.1's layer shapes (its config.json on the hub): what fixes its memory and its matmul sizes.
MISTRAL_7B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
}


def machine_info() -> dict[str, str]:
    """What a reader needs to compare timings across machines."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "CPU": cpu,
        "CPU count": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_facts(module: str, started: float, load_start: float) -> dict[str, str]:
    """The machine, the date, the load before and after, the run's length and the command of a benchmark run
    (`started`: its time.perf_counter() at the start, `load_start`: the 1-min load average then)."""
    return machine_info() | {
        "date": datetime.date.today().isoformat(),
        "1-min load average at start / end": f"{load_start:.2f} / {os.getloadavg()[0]:.2f}",
        "whole run": f"{(time.perf_counter() - started) / 60:.1f} min",
        "command": f"python -m benchmarks.{module} " + " ".join(sys.argv[1:]),
    }


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of `repeats` calls of `fn`: the least disturbed by other load on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def verdict(ratio: float, target: float) -> str:
    """A measured ratio in bold, against its target (≤) and whether it was met."""
    return f"**{ratio:.3f}** (target ≤ {target:.2f}: {'met' if ratio <= target else 'MISSED'})"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def key_values(facts: dict[str, object]) -> str:
    """A two-column markdown table of named facts."""
    return markdown_table(["", ""], [[k, v] for k, v in facts.items()])


def write_result(name: str, text: str) -> Path:
    """Write `results/<name>.md` and return its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    return path


def write_section(path: Path, name: str, text: str) -> Path:
    """Replace the `name` section of the markdown file at `path` (between its begin/end markers, appended when
    absent), so the scripts that share benchmarks/RESULTS.md never overwrite each other's figures."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    path.write_text(new)
    return path


# The reference both the synthetic and the real-model estimate benchmarks check G against: plain autograd.
def plain_pass(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Forward+backward with every weight requiring grad; gradients accumulate in `.grad`."""
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_sample_loss_sum(logits, batch["labels"])
        del logits
        loss.backward()


def max_relative_difference(model: torch.nn.Module, sums: dict[str, torch.Tensor]) -> float:
    """Largest ‖G − .grad‖ / ‖.grad‖ over target modules: both variants must compute the same gradient."""
    named = dict(model.named_modules())
    return max(float((g - named[n].weight.grad).norm() / named[n].weight.grad.norm()) for n, g in sums.items())
