"""The CLI end to end: click's runner, a real subprocess and shell pipeline, and every bad-input case."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import make_llama, save_model, write_jsonl

from lorasb_cli import artifacts, cli

BIN = Path(sys.executable).parent


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `lorasb ARGS` in-process through the real entry point (error handler included)."""
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


def test_the_stages_are_exactly_the_commands():
    assert set(cli.cli.commands) == {
        "estimate",
        "combine",
        "decompose",
        "train",
        "merge",
        "evaluate",
        "generate",
        "compare",
        "inspect",
        "data",
        "models",
        "run",
    }


def test_estimate_then_decompose_through_click_runner(tiny_model_dir, qa_file, tmp_path):
    runner = CliRunner()
    update = tmp_path / "u.safetensors"
    result = runner.invoke(
        cli.cli, ["estimate", "-m", str(tiny_model_dir), "-d", str(qa_file), "--samples", "6", "-q", "-o", str(update)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{update}\n"
    result = runner.invoke(
        cli.cli, ["decompose", str(update), "--rank", "4", "-q", "-o", str(tmp_path / "f.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'f.safetensors'}\n"
    assert artifacts.Artifact(tmp_path / "f.safetensors").fields["rank"] == 4


def test_json_summary_on_stdout(tiny_model_dir, qa_file, tmp_path, capsys):
    import json

    status, out, err = run(
        ["estimate", "-m", tiny_model_dir, "-d", qa_file, "--samples", "4", "--json", "-o", tmp_path / "u.safetensors"],
        capsys,
    )
    assert status == 0, err
    summary = json.loads(out)
    assert summary["path"] == str(tmp_path / "u.safetensors") and summary["samples"] == 4 and summary["modules"] == 14
    assert "samples" in err  # the summary table goes to stderr


def test_shell_pipeline_as_subprocess(tiny_model_dir, qa_file, tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    script = (
        f'lorasb decompose "$(lorasb estimate -m {tiny_model_dir} -d {qa_file} --samples 4 -o u.safetensors)" '
        "--rank 4 -o f.safetensors"
    )
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "f.safetensors\n"
    assert "estimate" in done.stderr and "captured energy" in done.stderr
    factors = artifacts.Artifact(tmp_path / "f.safetensors", kinds=("factors",))
    assert len(artifacts.factor_modules(factors)) == 14


def test_python_dash_m_works_the_same():
    done = subprocess.run(
        [sys.executable, "-m", "lorasb_cli", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and "estimate" in done.stdout and "decompose" in done.stdout


def _assert_one_line_error(status, out, err, pattern, tmp_path, expected_status=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == expected_status, err
    assert out == ""
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert pattern in lines[0], lines[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


@pytest.fixture()
def estimate_args(tiny_model_dir, qa_file, tmp_path):
    return ["estimate", "-m", tiny_model_dir, "-d", qa_file, "-q", "-o", tmp_path / "out.safetensors"]


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"-m": "mistrall"}, "unknown model 'mistrall'"),
        ({"-m": "./no/such/dir"}, "unknown model './no/such/dir'"),
        ({"-d": "missing.jsonl"}, "data file not found"),
        ({"--frac": "0"}, "'--frac': 0.0 is not in the range 0<x<=1"),
        ({"--frac": "1.5"}, "'--frac': 1.5 is not in the range 0<x<=1"),
        ({"--samples": "13"}, "--samples 13 is larger than the split (12 rows)"),
        ({"--targets": "nope_proj"}, "--targets 'nope_proj' matches no linear module"),
        ({"--format": "text"}, "--format text needs the fields text"),
        ({"--shard": "2/2"}, "--shard 2/2"),
        ({"--eta": "0"}, "'--eta': 0.0 is not in the range 1e-20<=x<=1"),
        ({"--dtype": "float8"}, "unknown --dtype 'float8'"),
    ],
)
def test_estimate_bad_input(estimate_args, tmp_path, capsys, change, pattern):
    args = list(estimate_args)
    for key, value in change.items():
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    _assert_one_line_error(*run(args, capsys), pattern, tmp_path)


def test_empty_and_fieldless_data_files(estimate_args, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "fields.jsonl", [{"foo": 1}])
    for name, pattern in (("empty.jsonl", "data file is empty"), ("fields.jsonl", "cannot tell the data format")):
        args = list(estimate_args)
        args[args.index("-d") + 1] = tmp_path / name
        _assert_one_line_error(*run(args, capsys), pattern, tmp_path)


def test_missing_option_is_one_line(capsys, tmp_path):
    _assert_one_line_error(*run(["estimate", "-d", "x.jsonl"], capsys), "Missing option '--model'", tmp_path)


def test_non_finite_gradient_is_bad_input(tmp_path, qa_file, capsys):
    model, tokenizer = make_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    save_model(model, tokenizer, tmp_path / "nan-model")
    capsys.readouterr()  # what saving printed
    status, out, err = run(
        [
            "estimate",
            "-m",
            tmp_path / "nan-model",
            "-d",
            qa_file,
            "--samples",
            "2",
            "-q",
            "-o",
            tmp_path / "out.safetensors",
        ],
        capsys,
    )
    _assert_one_line_error(status, out, err, "NaN/Inf in the gradient of model.layers.0", tmp_path)
    assert "--dtype float32" in err


@pytest.fixture()
def update_file(tiny_model_dir, qa_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("u") / "u.safetensors"
    cli_args = ["estimate", "-m", tiny_model_dir, "-d", qa_file, "--samples", "4", "-q", "-o", path]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in cli_args])
    assert excinfo.value.code == 0
    return path


@pytest.mark.parametrize(("rank", "pattern"), [("0", "0 is not in the range x>=1"), ("65", "pass --rank 32 or less")])
def test_decompose_bad_rank(update_file, tmp_path, capsys, rank, pattern):
    args = ["decompose", update_file, "--rank", rank, "-q", "-o", tmp_path / "out.safetensors"]
    _assert_one_line_error(*run(args, capsys), pattern, tmp_path)


def test_decompose_bad_update_files(update_file, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(update_file.read_bytes()[:-64])
    not_st = tmp_path / "notes.safetensors"
    not_st.write_text("hello")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    cases = [
        (truncated, "not a readable safetensors file"),
        (not_st, "not a lorasb artifact (safetensors) but a text file"),
        (plain, "safetensors file without lorasb metadata"),
        (tmp_path / "absent.safetensors", "file not found"),
    ]
    for path, pattern in cases:
        args = ["decompose", path, "--rank", "2", "-q", "-o", tmp_path / "out.safetensors"]
        _assert_one_line_error(*run(args, capsys), pattern, tmp_path)


def test_debug_shows_the_traceback(capsys, tmp_path):
    from lorasb_cli.errors import BadInputError

    with pytest.raises(BadInputError):
        cli.main(["decompose", str(tmp_path / "absent.safetensors"), "--rank", "2", "--debug"])


def test_inspect_describes_update_and_factors(update_file, tmp_path, capsys):
    import json

    status, out, err = run(["decompose", update_file, "--rank", "3", "-q", "-o", tmp_path / "f.safetensors"], capsys)
    assert status == 0, err
    status, out, _ = run(["inspect", tmp_path / "f.safetensors", "--json"], capsys)
    described = json.loads(out)
    assert status == 0 and described["kind"] == "factors" and described["rank"] == 3 and described["modules"] == 14
    # 14 modules of rank 3: R has 9 entries each; LoRA at rank 3 needs 3·(m+n) per module.
    assert described["parameters"]["trainable_R"] == 14 * 9
    assert described["shapes"]["model.layers.0.self_attn.k_proj"] == {"shape": [32, 64], "rank": 3}
    status, out, _ = run(["inspect", update_file], capsys)
    assert status == 0 and "update" in out and "model.layers.*.mlp.up_proj" in out
    _assert_one_line_error(*run(["inspect", tmp_path / "none"], capsys), "no such file", tmp_path)


# --- issue 15: listings that survive pipes ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["data", "list"], ["models"]])
def test_listings_in_a_pipe_are_whole_tab_separated_lines(args, capsys):
    from lorasb_cli import builtin_data, bundled
    from lorasb_cli.models import ALIASES

    status, out, _ = run(args, capsys)
    lines = out.splitlines()
    names = [line.split("\t")[0] for line in lines[1:]]
    expected = list(builtin_data.BUILTINS) if args == ["data", "list"] else [*bundled.BUNDLED, *ALIASES]
    assert status == 0 and lines[0].split("\t")[0] in ("name", "alias") and names == expected
    assert len({len(line.split("\t")) for line in lines}) == 1  # every line has every column
    assert "…" not in out


def test_listings_on_a_narrow_terminal_wrap_and_never_cut(monkeypatch):
    import io

    from rich.console import Console

    from lorasb_cli import builtin_data, console

    screen = io.StringIO()
    monkeypatch.setattr(console, "stdout", Console(file=screen, force_terminal=True, width=40, color_system=None))
    console.print_rows("built-in data sets", builtin_data.describe(), ["name", "description", "source"])
    text = screen.getvalue()
    assert "…" not in text
    # A folded cell continues on the next lines of its column: joined back, every name is whole.
    cells = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") >= 2)
    assert all(name in cells for name in builtin_data.BUILTINS)


def test_inspect_in_a_pipe_is_field_value_lines(update_file, capsys):
    status, out, _ = run(["inspect", update_file], capsys)
    fields = dict(line.split("\t", 1) for line in out.split("\n\n")[0].splitlines()[1:])
    assert status == 0 and fields["kind"] == "update" and fields["path"] == str(update_file)
    assert out.split("\n\n")[1].splitlines()[0] == "module\tcount\tshape (m×n)\trank"


def test_the_group_help_imports_no_stage():
    """Options are generated from the stage configs when a command parses: `lorasb --help` stays light. It lists
    the plug-ins from their declarations, which import none of their implementations."""
    code = "import sys; from lorasb_cli.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
    code += "heavy = ('torch', 'lorasb_cli.train', 'lorasb_cli.methods.', 'lorasb_cli.inits.')\n"
    code += "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "command", ["estimate", "combine", "decompose", "train", "merge", "evaluate", "generate", "compare"]
)
def test_every_config_field_is_one_option_of_its_command(command):
    from lorasb_cli import options

    group = cli.cli
    # made as the command line makes it: click caches a command's help option from the first context it sees
    with group.commands[command].make_context(command, [], resilient_parsing=True) as ctx:
        names = {p.name for p in group.commands[command].get_params(ctx)}
    config = group.commands[command].config_class
    declared = {f.name for f in options.cli_fields(config)}
    plugins = {f.name for f in options.plugin_fields_of(config)}
    assert declared | plugins <= names
    own = {"as_json", "quiet", "debug", "dry_run", "rank", "config"}  # config: --config FILE.yaml (recipes)
    assert {n for n in names - declared - plugins if not n.endswith("help")} <= own
