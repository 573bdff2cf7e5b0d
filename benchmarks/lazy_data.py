"""`lorasb estimate --frac 0.001` on a 400K-row JSONL against the same on 4K rows: time and peak RSS from process
start to the first forward (issue 12 item 5; targets: ≤ 2× the time, ≤ 1.2× the memory).

Data: two MetaMathQA-shaped JSONL files (`query`, `response`, `type`; query and response each ~300–600 chars of
varied, templated GSM-style text, deterministic from `--seed`) of `--large` and `--small` rows, the small one the
first rows of the large one's stream, written once under benchmarks/out/lazy_data/ (git-ignored) and reused.

Each measurement is a FRESH `python -c` subprocess (so imports, RSS and the data path are all real) that patches
`lorasb_cli.estimate.sum_gradients` with a stub which, on entry (the model is loaded, the drawn rows are tokenized,
the next step would be the first forward), reports the seconds since the subprocess was spawned and the peak RSS,
as one JSON line, and `os._exit`s; then it calls
`lorasb_cli.cli.main(["estimate", "--model", "smollm2-135m", "--data", FILE, "--frac", "0.001", "-o", OUT,
"--max-length", "256", "-q"])`. Peak RSS is `VmHWM` of the subprocess's address space; `ru_maxrss` is recorded
beside it (it also keeps the parent's RSS at the spawn, see benchmarks/train.py's `peak_rss_bytes`). The stub's
process also times the stages on the way (`models.resolve_model`; `data.load_dataset_rows` and inside it
`data._load_file` — datasets' JSON → Arrow conversion or cache hit — and `data._file_digest`; `data.sample_indices`;
`plan.model_facts` where it exists; `models.load_model`; `data.encode`), with the peak RSS after each and the
RSS split into anonymous and file-backed pages (RssAnon / RssFile: the memory-mapped Arrow cache is file-backed).

Cache states: `cold` = `HF_DATASETS_CACHE` a fresh empty folder (datasets converts the JSONL into Arrow); `warm` = a
second run on the same folder (datasets maps the Arrow file it wrote). The OS page cache holds the JSONL files in
both (they were just written or read). Before the rounds, one untimed run converts the bundled GGUF model into
$LORASB_HOME (once per machine) and warms the page cache for the model files. Rounds alternate the two sizes (the
order rotating each round), each size cold then warm; medians are reported.

    python -m benchmarks.lazy_data                    # 3 rounds; writes benchmarks/out/lazy_data/report.md and
                                                      # the lazy-data section of benchmarks/RESULTS.md
    python -m benchmarks.lazy_data --rounds 1 --large 40000 --small 400 --no-section   # quick look, no RESULTS.md
    python -m benchmarks.lazy_data --profile          # then cProfile one cold and one warm run of the large file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import ROOT, machine_info, markdown_table, verdict, write_section

HERE = Path(__file__).resolve().parent
RESULTS_PATH = HERE / "RESULTS.md"
OUT_DIR = HERE / "out" / "lazy_data"
MODEL = "smollm2-135m"
FRAC = 0.001
MAX_LENGTH = 256
TIME_TARGET = 2.0
MEMORY_TARGET = 1.2
MIB = 2**20
STATES = ("cold", "warm")
MARK = "LAZYDATA "

# ------------------------------------------------------------------------------------------------ the data files

NAMES = [
    "Janet",
    "Tom",
    "Maria",
    "Ahmed",
    "Lena",
    "Carlos",
    "Priya",
    "Kenji",
    "Olivia",
    "Samuel",
    "Fatima",
    "Noah",
    "Grace",
    "Ivan",
    "Chloe",
    "Mateo",
    "Aisha",
    "Lucas",
    "Mei",
    "Daniel",
]
ITEMS = [
    ("apples", "bag"),
    ("cookies", "box"),
    ("pencils", "pack"),
    ("marbles", "jar"),
    ("eggs", "carton"),
    ("stickers", "sheet"),
    ("books", "shelf"),
    ("cupcakes", "tray"),
    ("oranges", "crate"),
    ("cards", "deck"),
    ("flowers", "bunch"),
    ("bottles", "case"),
    ("candles", "set"),
    ("shirts", "pile"),
    ("tiles", "row"),
]
PLURALS = {"box": "boxes", "shelf": "shelves", "bunch": "bunches", "case": "cases"}
PLACES = ["the market", "school", "the bakery", "a garage sale", "the library", "the farm", "the mall", "a fair"]
TYPES = ["GSM_Rephrased", "GSM_AnsAug", "GSM_SV", "GSM_FOBAR", "MATH_AnsAug", "MATH_Rephrased", "MATH_SV"]
FILLERS = [
    "{n} has been saving money for {k} weeks to buy a present for a friend.",
    "On the way home, {n} stops at {p} and talks to the owner for a while.",
    "Each {c} costs ${a} and {n} pays with a ${b} bill.",
    "The weather that day is sunny, so {n} decides to walk instead of taking the bus.",
    "{n}'s neighbour already owns {b} {i}, which is {k} more than last year.",
    "It takes {k} minutes to sort every {c}, and {n} works without a break.",
    "Last month {n} gave away {a} {i} to classmates at {p}.",
    "A sign at {p} says that a {c} holds exactly {k} {i}.",
]
OPS = [("buys", "+"), ("finds", "+"), ("receives", "+"), ("sells", "-"), ("eats", "-"), ("loses", "-")]


def _sentence(rng: random.Random, name: str, item: str, container: str) -> str:
    return rng.choice(FILLERS).format(
        n=name,
        i=item,
        c=container,
        p=rng.choice(PLACES),
        a=rng.randint(2, 60),
        b=rng.randint(5, 200),
        k=rng.randint(2, 12),
    )


def make_row(rng: random.Random) -> dict:
    """One MetaMathQA-shaped row: a word problem (query) and a worked solution ending "The answer is: N"."""
    name, (item, container) = rng.choice(NAMES), rng.choice(ITEMS)
    containers = PLURALS.get(container, container + "s")
    per, boxes = rng.randint(3, 24), rng.randint(2, 15)
    verb, sign = rng.choice(OPS)
    total = per * boxes
    change = rng.randint(1, total - 1)
    answer = total + change if sign == "+" else total - change
    question = f"How many {item} does {name} have now?"
    facts = [
        f"{name} has {boxes} {containers} of {item}, and every {container} holds {per} {item}.",
        f"Then {name} {verb} {change} {item} at {rng.choice(PLACES)}.",
    ]
    fillers = []
    target = rng.randint(300, 520)
    while len(" ".join(facts)) + len(question) < target:
        fillers.append(_sentence(rng, name, item, container))
        facts.insert(rng.randrange(len(facts) + 1), fillers[-1])
    query = " ".join(facts) + " " + question
    steps = [
        f"{name} starts with {boxes} {containers} of {per} {item} each, so {boxes} * {per} = {total} {item}.",
        f"After {name} {verb} {change} {item}, the count is {total} {sign} {change} = {answer}.",
    ]
    target = rng.randint(300, 540)
    while fillers and len(" ".join(steps)) < target:
        steps.insert(1, f'"{fillers.pop()[:-1]}" does not change how many {item} there are.')
    while len(" ".join(steps)) < target:
        steps.append(f"Check: {answer} {'-' if sign == '+' else '+'} {change} = {total}, which is {boxes} * {per}.")
    response = " ".join(steps) + f"\nThe answer is: {answer}"
    return {"query": query, "response": response, "type": rng.choice(TYPES)}


def ensure_files(large: int, small: int, seed: int) -> dict[int, dict]:
    """Write (once) the JSONL files of `large` and `small` rows; the small one is the large one's first rows."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    paths = {n: OUT_DIR / f"metamathqa-like-{n}-seed{seed}.jsonl" for n in (large, small)}
    if not all(p.is_file() and p.with_suffix(".json").is_file() for p in paths.values()):
        start = time.perf_counter()
        rng = random.Random(seed)
        lengths: dict[int, list[tuple[int, int]]] = {n: [] for n in paths}
        with open(str(paths[large]) + ".tmp", "w") as big, open(str(paths[small]) + ".tmp", "w") as little:
            for i in range(large):
                row = make_row(rng)
                line = json.dumps(row) + "\n"
                big.write(line)
                lengths[large].append((len(row["query"]), len(row["response"])))
                if i < small:
                    little.write(line)
                    lengths[small].append(lengths[large][-1])
        for n, path in paths.items():
            os.replace(str(path) + ".tmp", path)
            q = [a for a, _ in lengths[n]]
            r = [b for _, b in lengths[n]]
            facts = {
                "rows": n,
                "bytes": path.stat().st_size,
                "query chars": [min(q), statistics.mean(q), max(q)],
                "response chars": [min(r), statistics.mean(r), max(r)],
                "seed": seed,
            }
            path.with_suffix(".json").write_text(json.dumps(facts))
        log(f"wrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - start:.0f} s)")
    return {n: {"path": p, **json.loads(p.with_suffix(".json").read_text())} for n, p in paths.items()}


# ------------------------------------------------------------------------------------------------ the subprocess

# Run as `python -c CHILD <lorasb argv...>`; prints one MARK-prefixed JSON line at the first forward.
CHILD = r"""
import time
T0 = time.time()
import json, os, resource, sys

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))  # KiB

PROFILE = os.environ.get("LAZYDATA_PROFILE")
if PROFILE:
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()

import lorasb_cli.cli
from lorasb_cli import data, estimate, models
try:
    from lorasb_cli import plan
except ImportError:
    plan = None

def memory():
    return {"rss_kib": status("VmRSS"), "hwm_kib": status("VmHWM"), "anon_kib": status("RssAnon"),
            "file_kib": status("RssFile")}

spans = [{"stage": "imports", "start": 0.0, "end": time.time() - T0, **memory()}]

def timed(module, name, count=None):
    if module is None or not hasattr(module, name):
        return
    inner = getattr(module, name)
    def wrapper(*args, **kwargs):
        start = time.time() - T0
        result = inner(*args, **kwargs)
        span = {"stage": f"{module.__name__.rsplit('.', 1)[-1]}.{name}", "start": start, "end": time.time() - T0,
                **memory()}
        if count is not None:
            span["count"] = count(args, result)
        spans.append(span)
        return result
    setattr(module, name, wrapper)

timed(models, "resolve_model")
timed(data, "load_dataset_rows", lambda args, result: len(result.rows))
timed(data, "_load_file")
timed(data, "_file_digest")
timed(data, "sample_indices", lambda args, result: len(result))
timed(plan, "model_facts")
timed(models, "load_model")
timed(data, "encode", lambda args, result: sum(len(e.input_ids) for e in result))

def first_forward(model, modules, batches, **kwargs):
    now = time.time()
    if PROFILE:
        profiler.disable()
        profiler.dump_stats(PROFILE)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("LAZYDATA " + json.dumps({
        "wall": now, "seconds": now - T0, **memory(),
        "ru_maxrss_kib": usage.ru_maxrss, "children_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "cpu_s": usage.ru_utime + usage.ru_stime, "spans": spans,
    }), flush=True)
    os._exit(0)

estimate.sum_gradients = first_forward
lorasb_cli.cli.main(sys.argv[1:])
print("lazy_data: estimate returned before the first forward", file=sys.stderr)
sys.exit(3)
"""


def run_child(path: Path, cache: Path, out: Path, profile: Path | None = None) -> dict:
    """One fresh subprocess up to the first forward; its figures (seconds counted from the spawn)."""
    argv = [
        "estimate",
        "--model",
        MODEL,
        "--data",
        str(path),
        "--frac",
        str(FRAC),
        "-o",
        str(out),
        "--max-length",
        str(MAX_LENGTH),
        "-q",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)}
    env.pop("LAZYDATA_PROFILE", None)
    if profile is not None:
        env["LAZYDATA_PROFILE"] = str(profile)
    spawned = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"lazy_data: the estimate subprocess failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARK) :])
    result["from_spawn"] = result["wall"] - spawned
    return result


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ the runs


def measure(files: dict[int, dict], rounds: int, work: Path) -> dict[tuple[int, str], list[dict]]:
    sizes = sorted(files, reverse=True)
    runs: dict[tuple[int, str], list[dict]] = {(n, s): [] for n in sizes for s in STATES}
    for i in range(rounds):
        for n in sizes[i % len(sizes) :] + sizes[: i % len(sizes)]:
            cache = Path(tempfile.mkdtemp(prefix=f"hf-datasets-{n}-", dir=work))
            for state in STATES:
                result = run_child(files[n]["path"], cache, work / "update.safetensors")
                runs[n, state].append(result)
                log(
                    f"round {i + 1}/{rounds} {n:>7,} rows {state}: {result['from_spawn']:6.2f} s to the first forward, "
                    f"peak RSS {result['hwm_kib'] / 1024:6.0f} MiB (ru_maxrss {result['ru_maxrss_kib'] / 1024:.0f})"
                )
            shutil.rmtree(cache, ignore_errors=True)
    return runs


def median(runs: list[dict], key) -> float:
    return statistics.median(key(r) for r in runs)


def mid(runs: list[dict], key: str) -> float:
    """The median of one recorded figure."""
    return statistics.median(r[key] for r in runs)


def stage_seconds(run: dict, stage: str) -> float:
    return sum(s["end"] - s["start"] for s in run["spans"] if s["stage"] == stage)


def stage_value(run: dict, stage: str, key: str):
    return next((s[key] for s in run["spans"] if s["stage"] == stage), None)


# (stage, what it is, nested inside the stage above it)
STAGES = [
    ("imports", "interpreter start → `lorasb_cli` (torch, transformers' CLI imports) imported", False),
    ("models.resolve_model", "find the bundled model (digest of its GGUF, converted folder)", False),
    ("data.load_dataset_rows", "the whole data load (imports datasets, then the two below)", False),
    ("data._load_file", "↳ `datasets.load_dataset('json', …)`: JSON → Arrow (cold), map the cached Arrow (warm)", True),
    ("data._file_digest", "↳ SHA-256 of the JSONL file (provenance digest)", True),
    ("data.sample_indices", "draw the `--frac` indices", False),
    ("plan.model_facts", "memory plan on a meta-device model (where `lorasb_cli.plan` has it)", False),
    ("models.load_model", "load SmolLM2-135M (float32) and tokenizer", False),
    ("data.encode", "read and tokenize the drawn rows", False),
]


def rows_drawn(runs: dict, n: int):
    """How many rows the `--frac` draw took from the `n`-row file (the same in every run)."""
    return stage_value(runs[n, "cold"][0], "data.sample_indices", "count")


def main_table(runs: dict, large: int, small: int) -> str:
    """Per size and cache state: seconds to the first forward, peak RSS, RSS split; then the large / small ratios."""
    secs = {k: median(v, lambda r: r["from_spawn"]) for k, v in runs.items()}
    hwm = {k: median(v, lambda r: r["hwm_kib"] * 1024) for k, v in runs.items()}
    maxrss = {k: median(v, lambda r: r["ru_maxrss_kib"] * 1024) for k, v in runs.items()}

    def excess(state):
        anon, file = (mid(runs[large, state], k) - mid(runs[small, state], k) for k in ("anon_kib", "file_kib"))
        return f"{anon / 1024:+.0f} / {file / 1024:+.0f}"

    rows = []
    for n in (large, small):
        for state in STATES:
            times = [r["from_spawn"] for r in runs[n, state]]
            rows.append(
                [
                    f"{n:,}",
                    state,
                    f"{secs[n, state]:.2f}",
                    f"{min(times):.2f} – {max(times):.2f}",
                    f"{hwm[n, state] / MIB:.0f}",
                    f"{maxrss[n, state] / MIB:.0f}",
                    f"{mid(runs[n, state], 'anon_kib') / 1024:.0f} / {mid(runs[n, state], 'file_kib') / 1024:.0f}",
                    f"{median(runs[n, state], lambda r: r['cpu_s']):.1f}",
                    rows_drawn(runs, n),
                ]
            )
    for state in STATES:
        rows.append(
            [
                f"**{large:,} / {small:,}**",
                state,
                verdict(secs[large, state] / secs[small, state], TIME_TARGET),
                "",
                verdict(hwm[large, state] / hwm[small, state], MEMORY_TARGET),
                f"{maxrss[large, state] / maxrss[small, state]:.3f}",
                excess(state),
                "",
                "",
            ]
        )
    return markdown_table(
        [
            "rows",
            "datasets cache",
            "s to first forward (median)",
            "range (s)",
            "peak RSS (MiB, VmHWM)",
            "ru_maxrss (MiB)",
            "RSS at first forward: anon / file-backed (MiB)",
            "CPU s",
            "rows drawn",
        ],
        rows,
    )


def stage_row(runs: dict, stage: str, what: str, large: int, small: int) -> list[str]:
    """One stage's median seconds per size and state, then the large file's peak (anon / file-backed) RSS after it."""
    cells = [f"`{stage}`", what]
    for n in (large, small):
        for state in STATES:
            cells.append(f"{statistics.median(stage_seconds(r, stage) for r in runs[n, state]):.2f}")
    for state in STATES:
        peak, anon, file = (
            statistics.median(stage_value(r, stage, k) or 0 for r in runs[large, state])
            for k in ("hwm_kib", "anon_kib", "file_kib")
        )
        cells.append(f"{peak / 1024:.0f} ({anon / 1024:.0f} / {file / 1024:.0f})")
    return cells


def stage_table(runs: dict, large: int, small: int) -> str:
    """Where the time goes: a row per recorded stage, then the rest ("other") and the in-process total."""
    stage_rows = [
        stage_row(runs, stage, what, large, small)
        for stage, what, _ in STAGES
        if any(stage_value(r, stage, "end") is not None for v in runs.values() for r in v)
    ]
    top = [stage for stage, _, nested in STAGES if not nested]
    cells = ["other", "click, `detect_format`, device, targets, ... (total − the stages above)"]
    for n in (large, small):
        for state in STATES:
            rest = statistics.median(
                r["seconds"] - sum(stage_seconds(r, stage) for stage in top) for r in runs[n, state]
            )
            cells.append(f"{rest:.2f}")
    stage_rows.append([*cells, "", ""])
    cells = ["**total**", "process start → first forward (in-process clock)"]
    for n in (large, small):
        for state in STATES:
            cells.append(f"{mid(runs[n, state], 'seconds'):.2f}")
    stage_rows.append([*cells, "", ""])
    return markdown_table(
        [
            "stage",
            "what",
            f"{large:,} cold (s)",
            f"{large:,} warm (s)",
            f"{small:,} cold (s)",
            f"{small:,} warm (s)",
            f"{large:,} cold: peak RSS after it (anon / file-backed RSS), MiB",
            f"{large:,} warm: the same",
        ],
        stage_rows,
    )


def file_table(files: dict[int, dict], runs: dict, large: int, small: int) -> str:
    """The two data files: path, size, field lengths, rows drawn and tokens encoded."""
    file_rows = []
    for n in (large, small):
        f = files[n]
        q, r = f["query chars"], f["response chars"]
        file_rows.append(
            [
                f"{n:,}",
                f"`{Path(f['path']).relative_to(ROOT)}`",
                f"{f['bytes'] / MIB:.1f}",
                f"{q[0]} / {q[1]:.0f} / {q[2]}",
                f"{r[0]} / {r[1]:.0f} / {r[2]}",
                rows_drawn(runs, n),
                stage_value(runs[n, "cold"][0], "data.encode", "count"),
            ]
        )
    return markdown_table(
        [
            "rows",
            "file",
            "MiB",
            "query chars min / mean / max",
            "response chars min / mean / max",
            "rows drawn",
            "tokens encoded",
        ],
        file_rows,
    )


def report(
    files: dict[int, dict], runs: dict, rounds: int, minutes: float, load: tuple[float, float], idle: str
) -> str:
    large, small = sorted(files, reverse=True)
    info = machine_info()
    idle = idle.split(":")[0]  # not the list of busy processes
    return f"""# Lazy data: `lorasb estimate --frac {FRAC}` on {large:,} against {small:,} JSONL rows

Written by `HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.lazy_data` (issue 12 item 5), {datetime.date.today()}.
Machine: {info["CPU count"]} CPU cores ({info["CPU"]}), no GPU, torch {info["torch"]} ({info["torch threads"]} threads),
python {info["python"]}; 1-min load average {load[0]:.2f} at start, {load[1]:.2f} at end ({idle}); whole run
{minutes:.1f} min.

Each figure: a fresh subprocess running `lorasb_cli.cli.main(["estimate", "--model", "{MODEL}", "--data", FILE,
"--frac", "{FRAC}", "-o", OUT, "--max-length", "{MAX_LENGTH}", "-q"])`, stopped at the entry of
`estimate.sum_gradients` (model loaded, drawn rows tokenized, the first forward next). Seconds count from the
spawn; peak RSS = the subprocess's VmHWM (`ru_maxrss` beside it); anon / file-backed = its RssAnon / RssFile
(file-backed: pages of mapped files — the memory-mapped Arrow cache, libraries, the model's safetensors). cold = `HF_DATASETS_CACHE` a fresh empty folder
(datasets converts the JSONL into Arrow); warm = the next run on that folder. {rounds} round{"s" * (rounds != 1)}, sizes alternating,
median (range over the rounds). The model was converted into $LORASB_HOME by an untimed warm-up run; the JSONL
files are in the OS page cache in every run.

{main_table(runs, large, small)}

Where the time goes (median seconds per stage, in order; ↳ = inside the stage above):

{stage_table(runs, large, small)}

Data (MetaMathQA-shaped rows `query`, `response`, `type`; generated from seed {files[large]["seed"]}, the small file
is the first {small:,} rows of the large one):

{file_table(files, runs, large, small)}
"""


def print_profile(path: Path, label: str, top: int) -> None:
    import pstats

    log(f"\n=== cProfile: {label} (top {top} by cumulative time) ===")
    stats = pstats.Stats(str(path), stream=sys.stderr)
    stats.sort_stats("cumulative").print_stats(top)
    log(f"=== cProfile: {label} (top {top} by own time) ===")
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=400_000, help="rows of the large file")
    parser.add_argument("--small", type=int, default=4_000, help="rows of the small file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated rows")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (each size cold then warm)")
    parser.add_argument("--output", type=Path, default=OUT_DIR / "report.md", help="markdown report to write")
    parser.add_argument("--no-section", action="store_true", help="do not write the section of benchmarks/RESULTS.md")
    parser.add_argument("--wait-idle", type=float, default=10, help="minutes to wait for other load to end (0: no)")
    parser.add_argument("--profile", action="store_true", help="also cProfile a cold and a warm run of the large file")
    args = parser.parse_args()
    if not args.large > args.small > 0:
        parser.error("--large must be larger than --small, both positive")

    started = time.perf_counter()
    files = ensure_files(args.large, args.small, args.seed)
    if args.wait_idle > 0:
        # In a subprocess: importing benchmarks/real.py (torch, peft, ...) here would raise this process's RSS,
        # which the estimate subprocesses' ru_maxrss inherits at the spawn.
        code = f"from benchmarks.real import wait_until_idle; print(wait_until_idle({args.wait_idle}))"
        idle = (
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
    else:
        idle = "idleness not checked"
    load_start = os.getloadavg()[0]
    log(f"start: load average {load_start:.2f}; {idle}")
    with tempfile.TemporaryDirectory(prefix="lazy-data-", dir=OUT_DIR) as folder:
        work = Path(folder)
        warm_up = time.perf_counter()
        run_child(files[args.small]["path"], work / "warm-up-cache", work / "update.safetensors")
        log(f"warm-up run (model conversion, page cache): {time.perf_counter() - warm_up:.0f} s")
        runs = measure(files, args.rounds, work)
        minutes = (time.perf_counter() - started) / 60
        text = report(files, runs, args.rounds, minutes, (load_start, os.getloadavg()[0]), idle)
        raw = OUT_DIR / "runs.json"
        raw.write_text(json.dumps({f"{n}:{s}": v for (n, s), v in runs.items()}, indent=1))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        log(f"wrote {args.output} and {raw}")
        if not args.no_section:
            write_section(RESULTS_PATH, "lazy-data", text)
            log(f"wrote the lazy-data section of {RESULTS_PATH}")
        print(text)
        if args.profile:
            cache = work / "profile-cache"
            for state in STATES:
                prof = OUT_DIR / f"profile-{args.large}-{state}.prof"
                run_child(files[args.large]["path"], cache, work / "update.safetensors", profile=prof)
                print_profile(prof, f"{args.large:,} rows, {state} datasets cache", 30)


if __name__ == "__main__":
    main()
