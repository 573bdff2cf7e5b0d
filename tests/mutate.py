"""Mutation testing: named one-line bugs in the core math and scoring code, each run against the tests that should
catch it (`make mutate`; not collected by pytest, and outside CI's time budget).

The repository's files (tracked, and untracked ones git does not ignore) are copied to a temporary folder once;
each mutation replaces its exact original text there, runs its tests with `pytest -x -m "not slow"` in the copy
(PYTHONPATH points at it, so the stages the tests launch run the mutated code too), and puts the file back. The
checkout itself is never written to, whatever stops the run. A mutation whose original text is not in its file
exactly once is reported stale: the table cannot silently drift from the code.

    python tests/mutate.py                      # every mutation; the table to stdout and benchmarks/results/mutate.md
    python tests/mutate.py --only load-update-plus-eta generate-pads-right
    python tests/mutate.py --list

Exit status 0 when every mutation is killed (or survives for a reason recorded as `equivalent`), 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mutate.md"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    original: str  # exact text, found once in the file
    replacement: str
    breaks: str  # the promise the mutation breaks
    tests: tuple[str, ...]  # pytest files or node ids, run in this order; the first failure kills the mutation
    equivalent: str | None = None  # for a mutation that cannot change behaviour: why it survives


REF = "tests/test_references.py"

MUTATIONS = (
    # ---- estimate: ΔW_avg = −η·sign(G)
    Mutation(
        "sign-update-no-negation",
        "lorasb_cli/estimate.py",
        "torch.sign(g).neg_().to(torch.int8)",
        "torch.sign(g).to(torch.int8)",
        "the update is −sign(G), not +sign(G)",
        ("tests/test_estimate.py::test_sign_update_is_minus_sign_of_g", REF),
    ),
    Mutation(
        "gradient-sum-keeps-last-batch",
        "lorasb_cli/estimate.py",
        "self.sums[name].add_(weight_grad.to(self.device))",
        "self.sums[name].copy_(weight_grad.to(self.device))",
        "G sums every batch",
        ("tests/test_estimate.py::test_hook_gradients_equal_autograd", "tests/test_estimate.py", REF),
    ),
    # ---- loss: the mean cross-entropy of each sample's supervised tokens
    Mutation(
        "loss-token-sum-not-sample-mean",
        "lorasb_cli/loss.py",
        "weights = supervised / counts.clamp(min=1)[:, None].to(torch.float32)",
        "weights = supervised.to(torch.float32)",
        "a sample's loss is the mean over its tokens",
        (f"{REF}::test_mean_loss_is_the_mean_of_each_samples_cross_entropy", "tests/test_estimate.py"),
    ),
    Mutation(
        "loss-targets-not-shifted",
        "lorasb_cli/loss.py",
        "targets = F.pad(labels[:, 1:], (0, 1), value=data.IGNORE)",
        "targets = labels",
        "position t predicts label t+1",
        (f"{REF}::test_mean_loss_is_the_mean_of_each_samples_cross_entropy", "tests/test_estimate.py"),
    ),
    # ---- artifacts: the readers
    Mutation(
        "load-update-plus-eta",
        "lorasb_cli/artifacts.py",
        "return artifact.get(name, torch.float32).mul_(artifact.meta.eta)",
        "return artifact.get(name, torch.float32).mul_(-artifact.meta.eta)",
        "decompose factors ΔW_avg = −η·sign(G), not its negation (the issue's first survivor)",
        ("tests/test_decompose.py", "tests/test_inits.py", "tests/test_budget.py", REF),
    ),
    Mutation(
        "reader-skips-hash-check",
        "lorasb_cli/artifacts.py",
        "if self.hashes is not None and shards.tensor_hash(tensor) != self.hashes[name]:",
        "if False:",
        "a tensor whose hash does not match is refused",
        ("tests/test_artifacts.py", "tests/test_integrity.py"),
    ),
    Mutation(
        "reader-skips-finite-check",
        "lorasb_cli/artifacts.py",
        "        check_finite(name, tensor, self.path)\n        return tensor",
        "        return tensor",
        "NaN/Inf tensors are refused",
        ("tests/test_artifacts.py", "tests/test_integrity.py"),
    ),
    Mutation(
        "factors-rank-above-min-accepted",
        "lorasb_cli/artifacts.py",
        "        if rank > min(m, n):",
        "        if rank > max(m, n):",
        "a factor rank above min(m, n) is refused",
        ("tests/test_artifacts.py", "tests/test_integrity.py"),
    ),
    # ---- adapter: base(x) + s·((x Aᵀ) Rᵀ) Bᵀ
    Mutation(
        "adapter-forward-r-transposed",
        "lorasb_cli/adapter.py",
        "xar = F.linear(xa.float(), layer.lora_R)",
        "xar = F.linear(xa.float(), layer.lora_R.T)",
        "the forward is B·R·A, not B·Rᵀ·A",
        ("tests/test_train.py::test_adapter_forward_matches_merged_weight_with_non_symmetric_r", REF),
    ),
    Mutation(
        "adapter-forward-drops-scale",
        "lorasb_cli/adapter.py",
        "return result + layer.scale * F.linear(",
        "return result + F.linear(",
        "the adapter adds s·B·R·A",
        ("tests/test_train.py::test_adapter_forward_matches_merged_weight_with_non_symmetric_r", REF),
    ),
    Mutation(
        "delta-weight-r-transposed",
        "lorasb_cli/adapter.py",
        "self.scale * (self.lora_B @ self.lora_R.detach() @ self.lora_A)",
        "self.scale * (self.lora_B @ self.lora_R.detach().T @ self.lora_A)",
        "ΔW = s·B·R·A",
        (
            "tests/test_train.py::test_adapter_forward_matches_merged_weight_with_non_symmetric_r",
            "tests/test_methods.py",
        ),
    ),
    Mutation(
        "inject-leaves-base-trainable",
        "lorasb_cli/adapter.py",
        "    model.requires_grad_(False)\n    wrapped = {}",
        "    wrapped = {}",
        "only R trains",
        ("tests/test_train.py::test_inject_and_remove_restore_the_model", "tests/test_train.py"),
    ),
    # ---- merge: W0 + s·B·R·A; PEFT lora_B = B·R, lora_alpha = s·r
    Mutation(
        "merge-r-transposed",
        "lorasb_cli/adapter.py",
        "torch.addmm(weight.float(), lora_B.float() @ lora_R.float(), lora_A.float(), alpha=scale)",
        "torch.addmm(weight.float(), lora_B.float() @ lora_R.float().T, lora_A.float(), alpha=scale)",
        "the merged weight is W0 + s·B·R·A",
        ("tests/test_merge.py",),
    ),
    Mutation(
        "merge-drops-scale",
        "lorasb_cli/adapter.py",
        "torch.addmm(weight.float(), lora_B.float() @ lora_R.float(), lora_A.float(), alpha=scale)",
        "torch.addmm(weight.float(), lora_B.float() @ lora_R.float(), lora_A.float(), alpha=1.0)",
        "the merge scales B·R·A by s",
        ("tests/test_merge.py",),
    ),
    Mutation(
        "peft-export-b-r-transposed",
        "lorasb_cli/merge.py",
        "(lora_B @ lora_R).contiguous()",
        "(lora_B @ lora_R.T).contiguous()",
        "the PEFT export's lora_B is B·R",
        ("tests/test_merge.py",),
    ),
    Mutation(
        "peft-alpha-ignores-scale",
        "lorasb_cli/merge.py",
        "value = lora.scale * rank",
        "value = rank",
        "PEFT's lora_alpha / r is the adapter's scale",
        ("tests/test_merge.py",),
    ),
    # ---- linalg: truncated SVD within 1% of Eckart–Young; rank ≤ min(m, n)
    Mutation(
        "exact-svd-takes-the-last-rows",
        "lorasb_cli/linalg.py",
        "return u[:, :rank], s[:rank], vh[:rank]",
        "return u[:, :rank], s[:rank], vh[-rank:]",
        "--exact is the rank-r truncation",
        ("tests/test_decompose.py", "tests/test_inits.py"),
    ),
    Mutation(
        "randomized-svd-no-power-iterations",
        "lorasb_cli/linalg.py",
        "torch.svd_lowrank(matrix, q=q, niter=niter)",
        "torch.svd_lowrank(matrix, q=q, niter=0)",
        "randomized SVD stays within 1% of the optimum on flat sign spectra",
        ("tests/test_decompose.py",),
    ),
    Mutation(
        "randomized-svd-no-oversampling",
        "lorasb_cli/linalg.py",
        "return max(16, rank // 2)",
        "return 0",
        "randomized SVD stays within 1% of the optimum on flat sign spectra",
        ("tests/test_decompose.py",),
    ),
    Mutation(
        "rank-check-against-max",
        "lorasb_cli/linalg.py",
        "        if rank > min(shape):",
        "        if rank > max(shape):",
        "--rank above min(m, n) is refused",
        ("tests/test_decompose.py",),
    ),
    # ---- budget: Σ r² ≤ N, greedy on captured energy per parameter
    Mutation(
        "budget-gain-not-per-parameter",
        "lorasb_cli/budget.py",
        "return float(energy[rank]) / (2 * rank + 1)",
        "return float(energy[rank])",
        "the greedy step is the most energy per added parameter",
        ("tests/test_budget.py",),
    ),
    Mutation(
        "budget-cost-off-by-one",
        "lorasb_cli/budget.py",
        "cost = 2 * ranks[module] + 1",
        "cost = 2 * ranks[module]",
        "raising r to r + 1 costs 2r + 1 parameters",
        ("tests/test_budget.py",),
    ),
    Mutation(
        "budget-stops-at-first-misfit",
        "lorasb_cli/budget.py",
        "continue  # this module's next step no longer fits; a cheaper module's may",
        "break",
        "a cheaper module's step is taken when a dearer one no longer fits",
        ("tests/test_budget.py",),
    ),
    # ---- tasks/math: GSM8K strict and flexible, MATH's last box
    Mutation(
        "gsm8k-strict-first-marker",
        "lorasb_cli/tasks/math.py",
        "after = _numbers(text[markers[-1].end() :]) if markers else []",
        "after = _numbers(text[markers[0].end() :]) if markers else []",
        "strict takes the number after the last answer marker",
        ("tests/test_tasks.py", "tests/test_evaluate.py"),
    ),
    Mutation(
        "gsm8k-strict-last-number",
        "lorasb_cli/tasks/math.py",
        "return after[0] if after else INVALID",
        "return after[-1] if after else INVALID",
        "strict takes the first number after the marker",
        ("tests/test_tasks.py", "tests/test_evaluate.py"),
    ),
    Mutation(
        "gsm8k-flexible-first-number",
        "lorasb_cli/tasks/math.py",
        "return found[-1] if found else INVALID",
        "return found[0] if found else INVALID",
        "flexible takes the last number",
        ("tests/test_tasks.py", "tests/test_evaluate.py"),
    ),
    Mutation(
        "number-sign-dropped",
        "lorasb_cli/tasks/math.py",
        'return -value if match["sign"] else value',
        "return value",
        "-3 is not 3",
        ("tests/test_tasks.py", "tests/test_evaluate.py"),
    ),
    Mutation(
        "answer-text-not-cut-at-next-turn",
        "lorasb_cli/tasks/math.py",
        "return _NEXT_TURN.split(output, maxsplit=1)[0]",
        "return output",
        "a new Alpaca turn the model starts is not its answer",
        ("tests/test_tasks.py", "tests/test_evaluate.py"),
    ),
    Mutation(
        "math-first-box",
        "lorasb_cli/tasks/math.py",
        "for match in reversed(starts):",
        "for match in starts:",
        "MATH takes the last \\boxed{}",
        ("tests/test_tasks.py",),
    ),
    # ---- generation and tasks/runner: generation, loglik and classification on a model
    Mutation(
        "generate-pads-right",
        "lorasb_cli/generation.py",
        'tokenizer.padding_side = "left"',
        'tokenizer.padding_side = "right"',
        "batched prompts answer as one at a time (the issue's third survivor)",
        ("tests/test_evaluate.py", "tests/test_templates.py", "tests/test_mistral.py", REF),
    ),
    Mutation(
        "generate-returns-length-order",
        "lorasb_cli/generation.py",
        "return [outputs[i] for i in range(len(prompts))]",
        "return list(outputs.values())",
        "answers come back in the prompts' order",
        (f"{REF}::test_batched_generation_equals_one_prompt_at_a_time", "tests/test_evaluate.py"),
    ),
    Mutation(
        "loglik-counts-prompt-and-padding",
        "lorasb_cli/tasks/runner.py",
        "return (picked * (targets != data.IGNORE)).sum(dim=1).tolist()",
        "return picked.sum(dim=1).tolist()",
        "a choice's score is Σ log p of its own tokens",
        (f"{REF}::test_loglik_is_the_sum_of_each_choice_tokens_log_probabilities", "tests/test_evaluate.py"),
    ),
    Mutation(
        "classify-argmin",
        "lorasb_cli/tasks/runner.py",
        "logits.argmax(-1).tolist()",
        "logits.argmin(-1).tolist()",
        "a classifier answers with its most likely class",
        (
            "tests/test_classification.py",
            "tests/test_evaluate.py",
            f"{REF}::test_classify_answers_each_texts_most_likely_label",
        ),
    ),
    Mutation(
        "evaluate-ignores-recorded-template",
        "lorasb_cli/generation.py",
        'templates.check_same(recorded.template, template, "training", force=options.force_template)',
        'templates.check_same(recorded.template, template, "training", force=True)',
        "evaluate refuses another template than the adapter's unless --force-template",
        ("tests/test_evaluate.py", "tests/test_templates.py"),
    ),
    # ---- train --resume, the run lock, Ctrl-C
    Mutation(
        "resume-ignores-changed-options",
        "lorasb_cli/train.py",
        "    if changed:\n",
        "    if False:\n",
        "--resume refuses another --lr, --max-steps, --dtype, ... (the issue's second survivor)",
        ("tests/test_train.py", "tests/test_resume.py"),
    ),
    Mutation(
        "resume-ignores-other-data",
        "lorasb_cli/train.py",
        "if recorded.data is not None and recorded.data.digest not in (None, inputs.train_set.digest):",
        "if False:",
        "--resume refuses other training rows",
        ("tests/test_resume.py",),
    ),
    Mutation(
        "resume-keeps-old-save-steps",
        "lorasb_cli/trainer.py",
        "        self.state.compute_steps(self.args, max_steps)\n",
        "",
        "a resumed run saves at its new --save-steps",
        ("tests/test_resume.py",),
    ),
    Mutation(
        "second-ctrl-c-ignored",
        "lorasb_cli/trainer.py",
        "            raise KeyboardInterrupt\n",
        "            pass\n",
        "a second Ctrl-C stops at once",
        ("tests/test_lock.py",),
    ),
    Mutation(
        "lock-taken-from-a-live-process",
        "lorasb_cli/files.py",
        "if not (host == socket.gethostname() and pid.isdigit() and not _running(int(pid))):",
        "if not (host == socket.gethostname() and pid.isdigit()):",
        "a running writer's lock is never taken over",
        ("tests/test_lock.py",),
    ),
    Mutation(
        "lock-counts-as-content",
        "lorasb_cli/files.py",
        "any(p.name != LOCK_FILE for p in out.iterdir())",
        "any(out.iterdir())",
        "a folder holding only a lock is not 'not empty' (ranks of a launched job)",
        ("tests/test_lock.py",),
    ),
)


@dataclass
class Result:
    mutation: Mutation
    line: int | None  # of the original text in its file
    status: str  # killed | survived | timeout | stale
    detail: str  # the first failing test, or why the mutation could not be applied
    seconds: float


def _copy_repository(dest: Path) -> None:
    """The files git tracks, and untracked ones it does not ignore, under `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


# pytest's short summary: "FAILED tests/x.py::test_y[a param] - the message" (a parameter id may hold spaces).
_FIRST_FAILURE = re.compile(r"^(?:FAILED|ERROR) (\S+?\[.*?\](?= - |$)|\S+)", re.MULTILINE)


def _environment(copy: Path) -> dict[str, str]:
    """The tests' environment: `copy` first on the path, so it shadows the editable install in every process."""
    path = os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def _check_imports_from(copy: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import lorasb_cli; print(lorasb_cli.__file__)"],
        cwd=copy,
        env=_environment(copy),
        capture_output=True,
        text=True,
        check=True,
    )
    if not Path(done.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"lorasb_cli imports from {done.stdout.strip()}, not from the copy {copy}")


def _run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str]:
    """Run `tests` in `copy`: ("passed" | "failed" | "timeout", the first failing test or what went wrong)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    # A session of its own, so that a timeout or Ctrl-C ends the tests' own subprocesses (torchrun, lorasb) too.
    proc = subprocess.Popen(
        cmd,
        cwd=copy,
        env=_environment(copy),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except BaseException as e:  # the timeout, or Ctrl-C
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            return "timeout", f"no result within {timeout:.0f} s"
        raise
    if proc.returncode == 0:
        return "passed", ""
    if proc.returncode in (1, 2):  # a test failed, or collection did (a mutation that breaks an import)
        match = _FIRST_FAILURE.search(output)
        return "failed", match[1] if match else "collection error"
    raise RuntimeError(f"pytest exited {proc.returncode} on {' '.join(tests)}:\n{output[-3000:]}")


def _mutate(copy: Path, mutation: Mutation, timeout: float) -> Result:
    file = copy / mutation.path
    text = file.read_text()
    found = text.count(mutation.original)
    if found != 1:
        return Result(mutation, None, "stale", f"the original text is in the file {found} times, not once", 0.0)
    index = text.index(mutation.original)
    line = text.count("\n", 0, index) + 1
    start = time.perf_counter()
    file.write_text(text[:index] + mutation.replacement + text[index + len(mutation.original) :])
    try:
        outcome, detail = _run_tests(copy, mutation.tests, timeout)
    finally:
        file.write_text(text)
    status = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[outcome]
    return Result(mutation, line, status, detail, time.perf_counter() - start)


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def report(results: list[Result]) -> str:
    """The markdown table of `results`, with the counts first."""
    count = lambda *statuses: sum(r.status in statuses for r in results)
    equivalent = sum(r.status == "survived" and r.mutation.equivalent is not None for r in results)
    summary = (
        f"`make mutate` (`tests/mutate.py`) at commit {_commit()}, {dt.date.today().isoformat()}: "
        f"{len(results)} mutations tried, {count('killed', 'timeout')} killed ({count('timeout')} by a timeout), "
        f"{count('survived')} survived ({equivalent} as equivalent code), {count('stale')} stale."
    )
    method = (
        "Each mutation changes one line of the code in a copy of the repository; its tests run in order with "
        '`pytest -x -m "not slow"`, and the first that fails kills it.'
    )
    lines = [
        "# Mutation testing",
        "",
        summary,
        "",
        method,
        "",
        "| # | mutation | where | breaks | result | killed by / why it survives | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, start=1):
        m = r.mutation
        where = f"`{m.path.removeprefix('lorasb_cli/')}:{r.line}`" if r.line else f"`{m.path}`"
        if r.status == "survived":
            result, detail = "**survived**", m.equivalent or "no test notices"
        else:
            result, detail = r.status, f"`{r.detail}`" if r.status == "killed" else r.detail
        detail = detail.replace("|", "\\|")  # a parameter id or a reason must not split the row
        lines.append(f"| {i} | `{m.name}` | {where} | {m.breaks} | {result} | {detail} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="Run these mutations only.")
    parser.add_argument("--list", action="store_true", help="List the mutations and exit.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Markdown report [default: {DEFAULT_OUT}].")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds per mutation's tests [default: 900].")
    parser.add_argument("--no-baseline", action="store_true", help="Skip the unmutated run of every selected test.")
    args = parser.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}\t{m.path}\t{m.breaks}")
        return 0
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown mutation {', '.join(unknown)} (--list shows them)")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    with tempfile.TemporaryDirectory(prefix="lorasb-mutate-") as folder:
        copy = Path(folder)
        _copy_repository(copy)
        _check_imports_from(copy)
        if not args.no_baseline:
            # Every selected test must pass unmutated, or a failure would be counted as a kill.
            every = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            print(f"baseline: {len(every)} test selections, unmutated", file=sys.stderr, flush=True)
            outcome, detail = _run_tests(copy, every, args.timeout * 2)
            if outcome != "passed":
                print(f"the unmutated tests do not pass ({outcome}: {detail}); fix them first", file=sys.stderr)
                return 1
        results = []
        for i, mutation in enumerate(chosen, start=1):
            result = _mutate(copy, mutation, args.timeout)
            results.append(result)
            print(
                f"[{i}/{len(chosen)}] {mutation.name}: {result.status} {result.detail} ({result.seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    table = report(results)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    failed = [r for r in results if r.status == "stale" or (r.status == "survived" and not r.mutation.equivalent)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
