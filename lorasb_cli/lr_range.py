"""`lorasb train --lr auto`: the learning rate from a range test (Smith 2017, "Cyclical Learning Rates for Training
Neural Networks" §3.3; fastai's `lr_find`).

From the initialized model, AdamW takes `STEPS` steps on training batches with the rate rising exponentially from
`LOW` to `HIGH`; after each step the loss of the held-out probe rows (the slice `--init-scale auto` chooses on,
held out of the training set once) is measured. The test stops once that loss passes `DIVERGED` × its best, and
picks the rate of the lowest loss: the largest rate that still lowered it, the peak a run's schedule (warm-up, then
linear decay) starts from, as Smith's one-cycle takes its largest rate from the test. fastai's `lr_find` suggests
a decade below it for long schedules. In benchmarks.quality's protocol (seed 0) the lowest loss was at 1.4e-2 for
MiniLM LoRA-SB r 16 (sweep's best 3.2e-2) and at 4.3e-3 for SmolLM2 LoRA-SB r 32 (sweep's best 3e-3): within one of
the sweep's half-decade steps, where a decade below would train 7-22× too slowly.
The trained tensors are then put back and the RNG state is the one before, so the run starts from the same
initialization and data order as with a number for `--lr`. A resumed run reuses the rate its run picked.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import adapter, data, files, loss, metadata, system
from .errors import BadInputError

log = logging.getLogger("lorasb")

LOW, HIGH = 1e-5, 1.0  # from below full fine-tuning's rates to past where any adapter diverges
STEPS = 20  # 4 rates a decade: about 0.5 of a 40-step run with the probe forwards, 10-15% of a 5-point sweep
DIVERGED = 4.0  # stop once the probe loss exceeds this many times its best
CURVE_FILE, PLOT_FILE = "lr_range.json", "lr_range.png"


@dataclass
class RangeTest:
    """The test's curve (`rates[i]`: the rate of step i; `losses[i]`: the probe loss after it), the probe loss
    before any step, the rate picked and the test's seconds."""

    rates: list[float]
    losses: list[float]
    start_loss: float
    lr: float
    seconds: float


def range_test(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    probe_loss: Callable[[], float],
    *,
    steps: int = STEPS,
    low: float = LOW,
    high: float = HIGH,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> RangeTest:
    """Run the range test on `model`'s trainable parameters with `batches` (cycled when fewer than `steps`) and
    return its curve and pick; the parameters, their gradients, the train/eval mode and the RNG state are as before."""
    params = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    device = params[0].device
    growth = (high / low) ** (1 / (steps - 1))
    optimizer = torch.optim.AdamW(params, lr=low, weight_decay=0.0)  # the Trainer's optimizer, fresh
    training, began = model.training, time.perf_counter()
    rates, losses = [], []

    def measure() -> float:
        model.eval()
        with autocast():
            return probe_loss()

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            start = measure()
            for step, batch in zip(range(steps), itertools.cycle(batches)):
                rates.append(low * growth**step)
                for group in optimizer.param_groups:
                    group["lr"] = rates[-1]
                model.train()  # as the Trainer steps (dropout)
                with autocast():
                    batch_loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                batch_loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(measure())
                if not math.isfinite(losses[-1]) or losses[-1] > DIVERGED * min(start, *losses):
                    break
        finally:
            with torch.no_grad():
                for param, tensor in zip(params, initial):
                    param.copy_(tensor)
                    param.grad = None
            model.train(training)
    return RangeTest(rates, losses, start, pick(rates, losses, start), time.perf_counter() - began)


def pick(rates: list[float], losses: list[float], start: float) -> float:
    """The rate of the lowest probe loss; the lowest rate tried when no step lowered the loss."""
    finite = [(value, rate) for rate, value in zip(rates, losses) if math.isfinite(value)]
    best_loss, best_rate = min(finite, default=(math.inf, rates[0]))
    if not best_loss < start:
        log.warning(
            "--lr auto: no rate from %g to %g lowered the probe loss (%.4f); training at %g",
            rates[0],
            rates[-1],
            start,
            rates[0],
        )
        return rates[0]
    return best_rate


def auto_lr(prepared, examples, batch_size: int, pad_id: int, device: torch.device, out: Path, resumed: Path | None):
    """`--lr auto`'s rate for a run whose method is `prepared` (methods.Prepared) on `examples` (train's _Examples):
    the range test's pick, its curve written into `out` (lr_range.json, lr_range.png); a resumed run's recorded
    one (its checkpoint's adapter_config.json `lr_auto`)."""
    if resumed is not None:
        lr = metadata.read_meta(json.loads((resumed / adapter.CONFIG_FILE).read_text()), str(resumed)).lr_auto
        log.info("--lr auto: the run's range test picked %g", lr)
        return lr
    if system.launcher_rank()[1] > 1:  # each process would test on its own and might pick another rate
        raise BadInputError(
            "--lr auto runs its range test in one process, not under a launcher",
            hint="run it once with --max-steps 1 without the launcher and pass its rate (lr_auto in "
            "adapter_config.json) as --lr",
        )
    probe = examples.held_out[:batch_size]  # one batch, the same rows after every step
    result = range_test(
        prepared.model,
        list(data.make_batches(examples.train[: STEPS * batch_size], batch_size, pad_id)),
        lambda: loss.mean_loss(prepared.model, probe, batch_size, pad_id),
        autocast=lambda: prepared.autocast(device),
    )
    log.info(
        "--lr auto: range test of %d steps (%.1f s), loss on %d held-out samples by lr %s → lr %g",
        len(result.rates),
        result.seconds,
        len(probe),
        ", ".join(f"{rate:.2g}: {value:.4f}" for rate, value in zip(result.rates, result.losses)),
        result.lr,
    )
    if system.is_main_process():
        write_curve(result, out)
    return result.lr


def write_curve(result: RangeTest, out: Path) -> None:
    """lr_range.json (the curve and pick) and lr_range.png (probe loss against rate, log axis, the pick marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with files.atomic_path(out / CURVE_FILE) as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(result.rates, result.losses, "o-", ms=3, lw=1.2, label="held-out loss after the step")
    ax.axhline(result.start_loss, color="grey", lw=0.8, ls=":", label="before the test")
    ax.axvline(result.lr, color="C3", lw=1.2, ls="--", label=f"picked lr {result.lr:.3g}")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log)", ylabel="loss", title="lorasb train --lr auto: range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    files.write_figure(fig, out / PLOT_FILE)
