"""Several processes and several machines (docs/design.md §2, §3, §5): shards combined by identity, not path; one
writer per launched job; DDP training equal to one process at the doubled batch; FSDP refused.

Launched jobs run 2 CPU processes with gloo. Every number is checked against a single-process run.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QA_ROWS, make_llama, save_model, write_jsonl

from lorasb_cli import adapter, artifacts, cli, console, data, estimate, models, train

BIN = Path(sys.executable).parent
EXAMPLE = Path(__file__).parents[1] / "examples" / "multi_gpu.sh"


def run(args: list, capsys) -> tuple[int, str, str]:
    """`lorasb ARGS` in-process through the real entry point (error handler included)."""
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


@pytest.fixture()
def console_state(monkeypatch):
    """Commands set the console's rank and quietness; put them back afterwards."""
    monkeypatch.setattr(console, "_rank", console._rank)
    monkeypatch.setattr(console, "_quiet", console._quiet)


def _machine(root: Path, model_dir: Path, data_file: Path) -> tuple[Path, Path]:
    """A copy of the model and the data in a folder of its own, as a second machine would hold them."""
    model = shutil.copytree(model_dir, root / "models" / "tiny-llama")
    (root / "data").mkdir(parents=True)
    return Path(model), Path(shutil.copy(data_file, root / "data" / "qa.jsonl"))


def _estimate_args(model, data_file, out, *extra) -> list:
    return ["estimate", "-m", model, "-d", data_file, "--samples", "8", "--dtype", "float64", "-q", "-o", out, *extra]


def test_combine_shards_estimated_on_two_machines(tiny_model_dir, qa_file, tmp_path, capsys):
    """The same model and data under other paths agree; another checkpoint of the same architecture does not."""
    parts = []
    for i, host in enumerate(("host-a", "host-b")):
        model, rows = _machine(tmp_path / host, tiny_model_dir, qa_file)
        status, out, err = run(
            _estimate_args(model, rows, tmp_path / host / f"part{i}.safetensors", "--raw", "--shard", f"{i}/2"), capsys
        )
        assert status == 0, err
        parts.append(out.strip())
    metas = [artifacts.Artifact(p).meta for p in parts]
    assert metas[0].base_model.id != metas[1].base_model.id
    assert metas[0].data.source != metas[1].data.source
    status, out, err = run(["combine", *parts, "-o", tmp_path / "update.safetensors"], capsys)
    assert status == 0, err
    assert out == f"{tmp_path / 'update.safetensors'}\n"

    status, _, err = run(_estimate_args(tiny_model_dir, qa_file, tmp_path / "single.safetensors"), capsys)
    assert status == 0, err
    single, combined = artifacts.Artifact(tmp_path / "single.safetensors"), artifacts.Artifact(out.strip())
    assert combined.fields["samples"] == 8 and single.names == combined.names
    for name in single.names:
        assert torch.equal(single.get(name), combined.get(name)), name
    digest = models.weights_digest(models.resolve_model(str(tiny_model_dir)))
    assert combined.fields["base_model"]["weights_digest"] == single.fields["base_model"]["weights_digest"] == digest

    # Same architecture, other random weights: the fingerprint agrees, the weights do not.
    other = save_model(*make_llama(seed=1), tmp_path / "host-b" / "models" / "other-llama")
    status, out, err = run(
        _estimate_args(other, qa_file, tmp_path / "other.safetensors", "--raw", "--shard", "1/2"), capsys
    )
    assert status == 0, err
    other_base = artifacts.Artifact(out.strip()).meta.base_model
    assert other_base.fingerprint == metas[0].base_model.fingerprint
    assert other_base.weights_digest != metas[0].base_model.weights_digest
    status, out, err = run(
        ["combine", parts[0], tmp_path / "other.safetensors", "-o", tmp_path / "x.safetensors"], capsys
    )
    assert (status, out) == (2, "") and err.startswith("Error: shards differ in base model weights"), err
    assert err.count("\n") == 1

    # Same file name, other rows: a different sampling.
    (tmp_path / "host-c").mkdir()
    edited = write_jsonl(
        tmp_path / "host-c" / "qa.jsonl",
        [*QA_ROWS[:-1], {"question": "What is 0 plus 0?", "answer": "0 plus 0 is 0. #### 0"}],
    )
    status, _, err = run(
        _estimate_args(tiny_model_dir, edited, tmp_path / "edited.safetensors", "--raw", "--shard", "1/2"), capsys
    )
    assert status == 0, err
    status, _, err = run(
        ["combine", parts[0], tmp_path / "edited.safetensors", "-o", tmp_path / "x.safetensors"], capsys
    )
    assert status == 2 and "different samplings (data digest" in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_data_digest_is_of_the_rows_not_the_path(qa_file, tmp_path):
    """Files, save_to_disk folders and hub-style folders copied elsewhere keep their digest; other rows change it."""
    import datasets

    rows = list(QA_ROWS)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "a" / "saved"))
    (tmp_path / "a" / "hub" / "data").mkdir(parents=True)
    shutil.copy(qa_file, tmp_path / "a" / "hub" / "data" / "train.jsonl")
    shutil.copy(qa_file, tmp_path / "a" / "qa.jsonl")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("saved", "hub", "qa.jsonl"):
        here, there = (data.load_dataset_rows(str(tmp_path / host / name)) for host in ("a", "b"))
        assert here.source != there.source and here.digest == there.digest, name
    # A folder holds Arrow rows: saved and hub-style folders of the same rows agree with each other too.
    assert (
        data.load_dataset_rows(str(tmp_path / "a" / "saved")).digest
        == data.load_dataset_rows(str(tmp_path / "a" / "hub")).digest
    )
    rows[3] = {**rows[3], "answer": rows[3]["answer"].replace("15", "16")}
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "c" / "saved"))
    assert data.load_dataset_rows(str(tmp_path / "c" / "saved")).digest != here.digest


def test_weights_digest_reads_content_not_path(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    model, tokenizer = make_llama()
    with torch.no_grad():  # a fine-tune of one weight
        model.model.layers[1].self_attn.v_proj.weight.add_(1e-3)
    tuned = save_model(model, tokenizer, tmp_path / "tuned")
    digest = lambda path: models.weights_digest(models.resolve_model(str(path)))
    assert digest(copy) == digest(tiny_model_dir) != digest(tuned)
    assert len(digest(copy)) == 16
    assert models.weights_digest(models.ModelRef(id="nobody/not-cached", path="nobody/not-cached")) is None


def test_single_process_stages_run_on_global_rank_0_only(
    tiny_model_dir, qa_file, tmp_path, capsys, monkeypatch, console_state
):
    """Under a launcher's environment (RANK, WORLD_SIZE) a stage that does not join the job runs on rank 0 alone."""
    update = tmp_path / "u.safetensors"
    estimate.estimate(estimate.EstimateConfig(model=str(tiny_model_dir), data=str(qa_file), out=str(update), samples=4))
    before = set(tmp_path.iterdir())
    capsys.readouterr()  # what estimate logged
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for args in (
        ["decompose", update, "--rank", "2", "-o", tmp_path / "f.safetensors"],
        ["inspect", update],
        ["combine", update, "-o", tmp_path / "c.safetensors"],
    ):
        assert run(args, capsys) == (0, "", "") and set(tmp_path.iterdir()) == before, args
    # A stage that joins the job reports its errors with the rank.
    status, out, err = run(
        [
            "train",
            "-m",
            tiny_model_dir,
            "-d",
            qa_file,
            "--method",
            "lora",
            "--rank",
            "2",
            "--lr",
            "-1",
            "-o",
            tmp_path / "run",
        ],
        capsys,
    )
    assert (status, out) == (
        2,
        "",
    ) and err == "[rank 1] Error: Invalid value for '--lr': -1.0 is not in the range x>0. (see 'lorasb train --help')\n"

    monkeypatch.setenv("RANK", "0")
    status, out, err = run(["decompose", update, "--rank", "2", "-q", "-o", tmp_path / "f.safetensors"], capsys)
    assert (status, out) == (0, f"{tmp_path / 'f.safetensors'}\n"), err
    assert artifacts.Artifact(tmp_path / "f.safetensors").fields["rank"] == 2
    status, out, err = run(
        [
            "compare",
            "-m",
            tiny_model_dir,
            "-d",
            qa_file,
            "-t",
            "gsm8k",
            "--methods",
            "lora:2",
            "-o",
            tmp_path / "report",
        ],
        capsys,
    )
    assert (status, out) == (2, "") and err.startswith("Error: lorasb compare runs its cells one process each"), err


@pytest.mark.parametrize("command", ["train", "estimate"])
def test_fsdp1_and_deepspeed_are_refused_in_one_line(
    command, tiny_model_dir, qa_file, factors_file, tmp_path, capsys, monkeypatch, console_state
):
    """accelerate launch's variables: DeepSpeed, and FSDP at its default version 1 (lorasb shards with FSDP2)."""
    args = [command, "-m", tiny_model_dir, "-d", qa_file, "-q", "-o", tmp_path / "out"]
    args += ["-f", factors_file] if command == "train" else []
    cases = [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "Error: lorasb does not support DeepSpeed (ACCELERATE_USE_DEEPSPEED"),
        ({"ACCELERATE_USE_FSDP": "true"}, "Error: lorasb shards with FSDP2; accelerate launch asks for FSDP version 1"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "Error: lorasb shards with FSDP2"),
    ]
    for variables, message in cases:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        status, out, err = run(args, capsys)
        assert (status, out) == (2, "") and err.count("\n") == 1 and err.startswith(message), err
        for name in variables:
            monkeypatch.delenv(name)
    assert not (tmp_path / "out").exists()


def _free_ports(count: int) -> int:
    """A port p such that p, p+1, ..., p+count-1 are free now (the example script's launches take one each)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65536:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


@pytest.mark.slow
def test_accelerate_launch_with_fsdp1_is_refused_on_every_rank(tiny_model_dir, qa_file, factors_file, tmp_path):
    """accelerate's FSDP at its default version 1: lorasb shards with FSDP2 (tests/test_fsdp.py runs that form)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        "accelerate",
        "launch",
        "--use_fsdp",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_ports(1)),
        "-m",
        "lorasb_cli",
        "train",
        "-m",
        str(tiny_model_dir),
        "-f",
        str(factors_file),
        "-d",
        str(qa_file),
        "-o",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0 and done.stdout == ""
    # The first rank to fail ends the job (torchrun stops the others), so one or both ranks print the line.
    errors = [line for line in done.stderr.splitlines() if "Error: lorasb shards with FSDP2" in line]
    assert errors and {line.split("Error:")[0] for line in errors} <= {"", "[rank 1] "}, done.stderr[-2000:]
    assert "exitcode  : 2" in done.stderr  # the refusal's status, as torchrun reports the failed rank
    assert not (tmp_path / "run").exists()


# Installed in every Python process of a launched job through PYTHONPATH: records each write under
# LORASB_AUDIT_ROOT (files opened for writing, renames, folders made) with the process's RANK. It sees what Python
# opens and renames, which is every write lorasb makes (files.atomic_path: mkstemp + os.replace; open for
# JSON and PNG); files that torch.save or safetensors open from C++ are not seen.
AUDIT_HOOK = """
import json, os, sys

_root, _log = os.environ.get("LORASB_AUDIT_ROOT"), os.environ.get("LORASB_AUDIT_LOG")
if _root and _log:
    _out = open(os.path.join(_log, f"{os.getpid()}.jsonl"), "a", buffering=1)
    _rank = os.environ.get("RANK", "-")
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _inside(path):
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(_root)
        except TypeError:  # a file descriptor
            return False

    def _hook(event, args):
        if event == "open" and isinstance(args[2], int) and args[2] & _WRITE and _inside(args[0]):
            paths = [args[0]]
        elif event == "os.rename" and _inside(args[1]):
            paths = [args[0], args[1]]
        elif event == "os.mkdir" and _inside(args[0]):
            paths = [args[0]]
        else:
            return
        record = {"rank": _rank, "event": event, "paths": [os.path.abspath(os.fsdecode(p)) for p in paths]}
        _out.write(json.dumps(record) + "\\n")

    sys.addaudithook(_hook)
"""

STEPS, LR = 3, 1e-2


def _train_reference(tiny_model_dir, qa_file, out, **overrides) -> Path:
    """One process, the batch of both ranks together (here the whole data set, so sample order cannot matter)."""
    config = train.TrainConfig.from_options(
        model=str(tiny_model_dir),
        data=str(qa_file),
        out=str(out),
        batch_size=len(QA_ROWS),
        max_steps=STEPS,
        lr=LR,
        dtype="float64",
        scheduler="constant",
        save_steps=2,
        logging_steps=1,
        **overrides,
    )
    return train.train(config).path


def _assert_same_training(run_dir: Path, reference: Path) -> None:
    """Equal adapters up to float error: ≤ 1e-4 of the most an entry can move in STEPS AdamW steps (≈ LR each)."""
    got, want = adapter.load_adapter(run_dir), adapter.load_adapter(reference)
    assert got.factors.keys() == want.factors.keys()
    for module, tensors in want.factors.items():
        for name, x, y in zip(artifacts.FACTOR_SUFFIXES, got.factors[module], tensors):
            assert (x - y).abs().max() <= 1e-4 * LR * STEPS, f"{module}.{name}"
    losses = [[s["loss"] for s in json.loads((d / "metrics.json").read_text())["loss"]] for d in (run_dir, reference)]
    assert len(losses[0]) == STEPS and losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert got.fields["base_model"] == want.fields["base_model"]


@pytest.mark.slow
def test_multi_gpu_example_on_two_processes(tiny_model_dir, qa_file, tmp_path):
    """examples/multi_gpu.sh, every command on 2 gloo processes: torchrun estimate, decompose, DDP training of R with
    torchrun and with accelerate launch, and PEFT LoRA with torchrun. Each launch prints one line and writes each
    file once, from rank 0; each result equals one process with the doubled batch."""
    out, logs, hooks = tmp_path / "out", tmp_path / "audit", tmp_path / "hooks"
    logs.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    python_path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": python_path,
        "OMP_NUM_THREADS": "1",
        "LORASB_AUDIT_ROOT": f"{out}{os.sep}",
        "LORASB_AUDIT_LOG": str(logs),
        "MODEL": str(tiny_model_dir),
        "DATA": str(qa_file),
        "OUT": str(out),
        "NPROC": "2",
        "PORT": str(_free_ports(4)),
        "SAMPLES": "8",
        "RANK_R": "4",
        "LORA_RANK": "4",
        "BATCH": str(len(QA_ROWS) // 2),
        "STEPS": str(STEPS),
        "LR": str(LR),
        "DTYPE": "float64",
        "TRAIN_ARGS": "--scheduler constant --save-steps 2 --logging-steps 1",
    }
    done = subprocess.run(["bash", str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    names = ["update.safetensors", "factors.safetensors", "lorasb-torchrun", "lorasb-accelerate", "lora-torchrun"]
    # One line per command: a second rank printing would add a line (and break the `$(...)` chain).
    assert done.stdout.splitlines() == [str(out / name) for name in names]

    _assert_one_writer(out, logs, names)
    _assert_same_as_one_process(out, tiny_model_dir, qa_file, tmp_path)


def _assert_one_writer(out: Path, logs: Path, names: list[str]) -> None:
    """The audit hook's events: rank 0 (or a launcher-free command) placed each output file once; rank 1 nothing."""
    events = [json.loads(line) for log in logs.glob("*.jsonl") for line in log.read_text().splitlines()]
    assert any(e["rank"] == "1" for e in events), "the hook saw no rank-1 process"  # so its silence below counts
    # Rank 1 only makes the checkpoint folders (the Trainer saves each rank's RNG state there, from C++).
    assert [e for e in events if e["rank"] not in ("0", "-") and e["event"] != "os.mkdir"] == []
    placed = collections.Counter((e["rank"], e["paths"][1]) for e in events if e["event"] == "os.rename")
    expected = {("0", str(out / "update.safetensors")), ("-", str(out / "factors.safetensors"))} | {
        ("0", str(out / run / file))
        for run in names[2:]
        for file in ("adapter.safetensors", "adapter_config.json", "metrics.json", "loss.png")
    }
    assert {key: placed[key] for key in expected} == dict.fromkeys(expected, 1)
    assert sum(
        count for (_, path), count in placed.items() if Path(path).parent in (out, *(out / n for n in names))
    ) == len(expected)


def _assert_same_as_one_process(out: Path, tiny_model_dir, qa_file, tmp_path: Path) -> None:
    """The launched jobs' update and runs equal one process's, and the provenance carries the weights' digest."""
    single = tmp_path / "single.safetensors"
    estimate.estimate(
        estimate.EstimateConfig(
            model=str(tiny_model_dir), data=str(qa_file), out=str(single), samples=8, dtype="float64"
        )
    )
    two, one = artifacts.Artifact(out / "update.safetensors"), artifacts.Artifact(single)
    assert two.fields["samples"] == 8 and two.names == one.names
    for name in one.names:
        assert torch.equal(two.get(name), one.get(name)), name
    factors_path = str(out / "factors.safetensors")
    reference = _train_reference(tiny_model_dir, qa_file, tmp_path / "lorasb-one", factors=factors_path)
    _assert_same_training(out / "lorasb-torchrun", reference)
    _assert_same_training(out / "lorasb-accelerate", reference)
    _assert_same_training(
        out / "lora-torchrun", _train_reference(tiny_model_dir, qa_file, tmp_path / "lora-one", method="lora", rank=4)
    )
    # Provenance carries the checkpoint's identity through every stage.
    digest = models.weights_digest(models.resolve_model(str(tiny_model_dir)))
    factors = artifacts.Artifact(out / "factors.safetensors").meta
    assert two.meta.base_model.weights_digest == factors.base_model.weights_digest == digest
    assert adapter.load_adapter(out / "lorasb-torchrun").fields["base_model"]["weights_digest"] == digest


# `python RECORD_GRADS train ...`, alone or under torchrun: each process saves the gradients of the trained tensors
# of the first step, after DDP's all-reduce and before clipping or AdamW (which would hide a constant factor), to
# $GRADS_OUT/rank<RANK>.pt.
RECORD_GRADS = """
import os, sys, torch
from lorasb_cli.trainer import AdapterTrainer
clip = AdapterTrainer._clip_grad_norm
def recording(self, model):
    if self.state.global_step == 0:
        params = self.accelerator.unwrap_model(model).named_parameters()
        grads = {n: p.grad.detach().clone() for n, p in params if p.requires_grad}
        torch.save(grads, os.path.join(os.environ["GRADS_OUT"], f"rank{os.environ.get('RANK', '0')}.pt"))
    return clip(self, model)
AdapterTrainer._clip_grad_norm = recording
from lorasb_cli.cli import main
main(sys.argv[1:])
"""


def _token_mean_gradient(model_dir: Path, factors_file: Path) -> dict[str, torch.Tensor]:
    """∇_R of the mean cross-entropy over every supervised token of all QA_ROWS in one batch (F.cross_entropy), the
    step's loss the README promises across ranks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapter.inject(model, artifacts.load_factors(factors_file).factors)
    batch = data.collate(data.encode(QA_ROWS, "prompt-response", tokenizer, 256), tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    vocab = logits.shape[-1]
    labels = batch["labels"][:, 1:].reshape(-1)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels, ignore_index=data.IGNORE).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_ddp_gradient_is_the_token_mean_over_both_ranks(tiny_model_dir, qa_file, factors_file, tmp_path):
    """2 gloo processes with 6 rows each: the gradient of R each process steps with equals the gradient of the loss
    over all 12 rows' tokens, on the gradient itself (AdamW's step and clipping are scale-free, so checking the
    trained R alone would let a factor of 2 through)."""
    script = tmp_path / "record_grads.py"
    script.write_text(RECORD_GRADS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADS_OUT": str(tmp_path)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    args = ["train", "-m", tiny_model_dir, "-f", factors_file, "-d", qa_file, "--batch-size", len(QA_ROWS) // 2]
    args += ["--max-steps", "1", "--dtype", "float64", "-q", "-o", tmp_path / "run"]
    cmd = [*launch, str(_free_ports(1)), str(script), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    expected = _token_mean_gradient(tiny_model_dir, factors_file)
    assert ranks[0].keys() == ranks[1].keys() == expected.keys() and len(expected) == 14
    for name, want in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # one all-reduced gradient
        torch.testing.assert_close(ranks[0][name].double(), want.double(), rtol=0, atol=1e-5 * float(want.abs().max()))
