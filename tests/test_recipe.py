"""Recipes (issue 28.1): `--config FILE.yaml` on every command, and `lorasb run RECIPE.yaml`, which runs the chain
into one folder and skips the stages whose outputs are up to date."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
import yaml

from lorasb_cli import artifacts, cli, pipeline

EXAMPLES = Path(__file__).parents[1] / "examples" / "recipes"


def run(args: list, capsys) -> tuple[int, str, str]:
    """`lorasb ARGS` in-process through the real entry point (error handler included)."""
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


def write_recipe(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture()
def recipe(tiny_model_dir, qa_file, tmp_path) -> dict:
    """The chain on the tiny model: top-level options every stage shares, and sections of stage options."""
    return {
        "out": str(tmp_path / "out"),
        "model": str(tiny_model_dir),
        "data": str(qa_file),
        "samples": 8,  # estimate's
        "rank": 4,  # estimate's and decompose's; not train's --rank (a method's option, sections only)
        "seed": 0,
        "template": "plain",
        "max-length": 128,
        "batch_size": 4,
        "train": {"max_steps": 2, "lr": 1e-2, "save_steps": 100},
        "evaluate": {"task": "gsm8k", "data": str(qa_file), "limit": 4, "max_new_tokens": 4},
    }


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of every file and folder under `folder`: any rewrite or replacement changes one."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in [folder, *folder.rglob("*")]}


def ran(err: str) -> list[str]:
    """The stages a `lorasb run` says it ran (the others say they were skipped)."""
    skipped = [s for s in pipeline.STAGES if f"{s}: up to date, skipped" in err]
    done = [s for s in pipeline.STAGES if f"{s}: done in" in err]
    assert set(skipped).isdisjoint(done)
    return done


def test_a_recipe_runs_the_chain_and_a_rerun_skips_every_stage(recipe, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = Path(recipe["out"])
    code, stdout, err = run(["run", path], capsys)
    assert code == 0, err
    assert stdout == f"{out}\n"
    assert ran(err) == list(pipeline.STAGES)
    for name in ("update.safetensors", "factors.safetensors", "run/adapter.safetensors", "merged/config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["count"] == 4  # evaluate's --limit, from its section
    assert (out / "results.predictions.jsonl").read_text().count("\n") == 4
    # Each stage got the recipe's options as --config gives them: the same update as `estimate --config` writes.
    code, _, err = run(["estimate", "--config", path, "-q", "-o", tmp_path / "u.safetensors"], capsys)
    assert code == 0, err
    alone, chained = artifacts.Artifact(tmp_path / "u.safetensors"), artifacts.Artifact(out / "update.safetensors")
    assert alone.meta.samples == chained.meta.samples == 8
    assert alone.meta.content_digest() == chained.meta.content_digest()
    assert artifacts.Artifact(out / "factors.safetensors").meta.rank == 4
    assert json.loads((out / "run" / "adapter_config.json").read_text())["train"]["max_steps"] == 2
    recorded = json.loads((out / "run.json").read_text())["stages"]
    assert sorted(recorded) == sorted(pipeline.STAGES) and recorded["train"]["options"]["lr"] == 1e-2

    before = stamps(out)
    code, stdout, err = run(["run", path, "--json"], capsys)
    assert code == 0, err
    assert ran(err) == [] and all(f"{s}: up to date, skipped" in err for s in pipeline.STAGES)
    assert all(stage["skipped"] for stage in json.loads(stdout)["stages"].values())
    assert stamps(out) == before  # no file rewritten, replaced or added


def test_a_changed_train_option_reruns_train_merge_and_evaluate_only(recipe, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = Path(recipe["out"])
    assert run(["run", path, "-q"], capsys)[0] == 0
    before, adapter = stamps(out), artifacts.Artifact(out / "run" / "adapter.safetensors")
    recipe["train"]["lr"] = 2e-2
    code, _, err = run(["run", write_recipe(path, recipe)], capsys)
    assert code == 0, err
    assert ran(err) == ["train", "merge", "evaluate"]
    after = stamps(out)
    assert all(after[name] == before[name] for name in ("update.safetensors", "factors.safetensors"))
    assert after["run/adapter.safetensors"] != before["run/adapter.safetensors"]
    assert artifacts.Artifact(out / "run" / "adapter.safetensors").meta.content_digest() != (
        adapter.meta.content_digest()
    )
    assert json.loads((out / "run" / "adapter_config.json").read_text())["train"]["lr"] == 2e-2


def test_a_killed_run_reruns_only_what_is_missing(recipe, tmp_path, capsys):
    """A run killed during merge leaves no merged/ and no results (outputs are atomic): those two run again."""
    import shutil

    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = Path(recipe["out"])
    assert run(["run", path, "-q"], capsys)[0] == 0
    shutil.rmtree(out / "merged")
    (out / "results.json").unlink()
    (out / "results.predictions.jsonl").unlink()
    before = stamps(out)
    code, _, err = run(["run", path], capsys)
    assert code == 0, err
    assert ran(err) == ["merge", "evaluate"]
    after = stamps(out)
    assert all(after[name] == before[name] for name in before if name.split("/")[0] in ("update.safetensors", "run"))
    # A changed input, not only an option, reruns its stage: another update, so decompose and what follows.
    (out / "update.safetensors").unlink()
    code, _, err = run(["run", path, "--stages", "estimate,decompose"], capsys)
    assert code == 0, err
    assert ran(err) == ["estimate", "decompose"]


def test_config_gives_defaults_and_a_flag_wins(recipe, tiny_model_dir, tmp_path, capsys):
    path = write_recipe(
        tmp_path / "recipe.yaml", recipe | {"estimate": {"eta": "2e-5", "targets": ["q_proj", "v_proj"]}}
    )
    code, _, err = run(["estimate", "--config", path, "-q", "-o", tmp_path / "a.safetensors"], capsys)
    assert code == 0, err
    meta = artifacts.Artifact(tmp_path / "a.safetensors").meta
    assert (meta.samples, meta.eta, meta.targets) == (8, 2e-5, "q_proj,v_proj")  # a YAML list: the comma list
    flags = ["--samples", 5, "--eta", "3e-5", "-m", tiny_model_dir]
    code, _, err = run(["estimate", "--config", path, *flags, "-q", "-o", tmp_path / "b.safetensors"], capsys)
    assert code == 0, err
    meta = artifacts.Artifact(tmp_path / "b.safetensors").meta
    assert (meta.samples, meta.eta) == (5, 3e-5)


@pytest.mark.parametrize(
    "document, message",
    [
        ({"max_step": 3}, "unknown key 'max_step' in the recipe (RECIPE) — did you mean 'max_steps'?"),
        ({"train": {"learning_rate": 1}}, "unknown 'learning_rate' in section 'train:' in the recipe (RECIPE) — "),
        (
            {"trian": {"lr": 1}},
            "unknown section 'trian:' (no such command) in the recipe (RECIPE) — did you mean 'train'?",
        ),
        ({"train": {"lr": -1}}, "Invalid value for '--lr': -1.0 is not in the range x>0."),  # click's own check
        ({"train": {"max_steps": True}}, "max_steps takes a value, not true/false"),
    ],
)
def test_a_bad_key_or_value_is_one_line_and_exit_2(document, message, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", {"model": "m", "data": "d.jsonl"} | document)
    for args in (["train", "--config", path, "-o", tmp_path / "run"], ["run", path, "-o", tmp_path / "out"]):
        code, stdout, err = run(args, capsys)
        assert code == 2 and stdout == "" and err.count("\n") == 1, err
        assert message.replace("RECIPE", str(path)) in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_the_learning_rate_suggestion_names_the_closest_option(tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", {"train": {"lrr": 1}})
    code, _, err = run(["train", "--config", path], capsys)
    assert code == 2 and "did you mean 'lr'? (see 'lorasb train --help')" in err


def test_run_refuses_what_the_chain_sets(recipe, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe | {"train": {"factors": "mine.safetensors"}})
    code, _, err = run(["run", path], capsys)
    assert code == 2 and "'factors' in section 'train:': lorasb run sets it" in err
    assert not Path(recipe["out"]).exists()


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_recipe_parses_into_every_stage_config(example):
    """Every key is an option of its stage and every value converts and lies in its range (no model is loaded)."""
    ctx = click.Context(cli.cli)
    out, configs = cli.stage_configs(ctx, str(example))
    assert list(configs) == list(pipeline.STAGES) and out.name
    assert configs["train"].factors == os.path.join(out, "factors.safetensors")


@pytest.mark.slow
def test_run_under_torchrun_estimates_data_parallel_and_agrees_on_skips(recipe, tmp_path, capsys):
    """2 gloo processes: estimate (and train) data-parallel, the rest on rank 0; the update equals the one-process
    update, one stdout line, and a rerun skips every stage on both ranks without rewriting a file."""
    import socket
    import subprocess
    import sys

    recipe["estimate"] = {"dtype": "float64"}  # sums in another order: equal to the bit in float64
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = Path(recipe["out"])
    code, _, err = run(["estimate", "--config", path, "-q", "-o", tmp_path / "alone.safetensors"], capsys)
    assert code == 0, err

    def launch() -> subprocess.CompletedProcess:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [*cmd, "-m", "lorasb_cli", "run", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    done = launch()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == f"{out}\n"  # rank 0 alone prints
    assert ran(done.stderr) == list(pipeline.STAGES)
    together, alone = artifacts.Artifact(out / "update.safetensors"), artifacts.Artifact(tmp_path / "alone.safetensors")
    assert together.meta.content_digest() == alone.meta.content_digest()
    assert (out / "results.json").is_file()

    before = stamps(out)
    done = launch()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == f"{out}\n" and ran(done.stderr) == []
    assert done.stderr.count("estimate: up to date, skipped") == 1  # rank 0 speaks for the job
    assert stamps(out) == before


def test_a_bad_recipe_is_refused_before_any_heavy_import(tmp_path):
    from test_cli_startup import heavy_of, run_cli

    path = write_recipe(tmp_path / "recipe.yaml", {"model": "m", "train": {"lrr": 1}})
    done, modules = run_cli("train", "--config", str(path))
    assert done.returncode == 2 and "did you mean 'lr'?" in done.stderr
    assert heavy_of(modules) == set()
