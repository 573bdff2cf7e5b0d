"""compare: one row per method × rank, the PNGs, resuming only unfinished cells, and its option parsing."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import CLASS_ROWS, QA_ROWS, make_bert_dir, write_jsonl

from lorasb_cli import compare
from lorasb_cli.cli import main
from lorasb_cli.errors import BadInputError
from lorasb_cli.tasks import get_task

PNG_MAGIC = b"\x89PNG"


def _settings(tiny_model_dir, qa_file, **overrides):
    defaults = {"task": "perplexity", "max_steps": 2, "batch_size": 4, "samples": 4}
    return compare.GridSettings(
        model=str(tiny_model_dir), data=str(qa_file), eval_data=str(qa_file), **(defaults | overrides)
    )


def test_grid_writes_one_row_per_method_and_rank_and_the_pngs(tiny_model_dir, qa_file, tmp_path):
    pairs = compare.parse_methods("lorasb,lora-xs,lora:2,full", [2, 4])
    cells = compare.grid(pairs, 2, compare.parse_lrs("full=1e-3,1e-2"))
    results = compare.run_grid(tmp_path, _settings(tiny_model_dir, qa_file), cells)
    base = compare.score_base(tmp_path, _settings(tiny_model_dir, qa_file), results)
    report = compare.write_report(tmp_path, _settings(tiny_model_dir, qa_file), results, base=base)
    # "Before" is the base model prompted exactly as the cells' adapters are.
    cell_eval = json.loads((tmp_path / "cells" / cells[0].key / "eval.json").read_text())
    assert base["template"] == cell_eval["template"] and base["config"]["template_of"].endswith("/run")
    assert "Before training, the base model scores" in report.read_text()

    rows = compare.aggregate(results, get_task("perplexity"))
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("lorasb", 2),
        ("lorasb", 4),
        ("lora-xs", 2),
        ("lora-xs", 4),
        ("lora", 2),
        ("full", None),
    ]
    assert all(r["seeds"] == 2 for r in rows)
    # Seeds differ (own estimate and init per seed), and the cheaper methods train fewer parameters.
    by = {(r["method"], r["rank"]): r for r in rows}
    assert by[("lorasb", 2)]["trainable_params"] == 2 * 2 * 7 * 2  # r² per module, 7 modules × 2 layers
    assert (
        by[("lorasb", 4)]["trainable_params"]
        < by[("lora", 2)]["trainable_params"]
        < by[("full", None)]["trainable_params"]
    )
    assert by[("full", None)]["lr"] == 1e-3 and by[("lora", 2)]["lr"] == 1e-2
    assert len(list((tmp_path / "updates").glob("*.safetensors"))) == 2  # one estimate per seed, shared
    text = report.read_text()
    assert text.count("\n| ") == 1 + len(rows)  # header + one line per row
    # --metric ranks by another of the task's metrics; one the task does not report is a one-line error
    by_tokens = compare.aggregate(results, get_task("perplexity"), "tokens")
    assert all(r["metric"] == "tokens" and r["mean"] > 0 for r in by_tokens)
    with pytest.raises(BadInputError, match="--metric flexible_accuracy: the task reports"):
        compare.aggregate(results, get_task("perplexity"), "flexible_accuracy")
    for png in ("loss.png", "metric.png"):
        assert (tmp_path / png).read_bytes()[:4] == PNG_MAGIC
    payload = json.loads((tmp_path / "results.json").read_text())
    assert len(payload["cells"]) == len(cells) and len(payload["rows"]) == len(rows)


def test_a_metric_the_task_lacks_stops_the_grid_after_its_first_cell(tiny_model_dir, qa_file, tmp_path):
    cells = compare.grid(compare.parse_methods("lora:2", [2]), 2, compare.parse_lrs("1e-2"))
    settings = _settings(tiny_model_dir, qa_file, metric="vibes")
    with pytest.raises(BadInputError, match="--metric vibes: the task reports loss"):
        compare.run_grid(tmp_path, settings, cells)
    assert len(list((tmp_path / "cells").glob("*/cell.json"))) == 1  # the second seed never ran


def test_a_gap_inside_the_seeds_spread_is_marked_noise():
    def row(name, mean, std, seeds=3, metric="accuracy"):
        return {"method": name, "mean": mean, "std": std, "seeds": seeds, "metric": metric}

    rows = compare.mark_noise([row("a", 0.50, 0.02), row("b", 0.47, 0.02), row("c", 0.40, 0.02)], higher_is_better=True)
    assert [r["vs_best"] for r in rows] == ["best", "within noise", "below"]
    losses = compare.mark_noise(
        [row("a", 1.2, 0.05, metric="loss"), row("b", 1.0, 0.05, metric="loss")], higher_is_better=False
    )
    assert [r["vs_best"] for r in losses] == ["below", "best"]
    one_seed = [row("a", 0.5, 0.0, seeds=1), row("b", 0.4, 0.0, seeds=1)]
    assert compare.mark_noise(one_seed, higher_is_better=True)[1]["vs_best"] == "n/a"


def test_rerun_after_a_kill_reruns_only_unfinished_cells(tiny_model_dir, qa_file, tmp_path, monkeypatch):
    cells = compare.grid(compare.parse_methods("lorasb,lora", [2]), 2, compare.parse_lrs("1e-2"))
    settings = _settings(tiny_model_dir, qa_file)
    real_run_cell = compare.runs.run_cell
    ran: list[str] = []

    def killed_at_third(out, setup, cell):
        if len(ran) == 2:
            (out / "cells" / cell.key).mkdir(parents=True)  # the killed cell's partial folder
            raise KeyboardInterrupt
        ran.append(cell.key)
        return real_run_cell(out, setup, cell)

    monkeypatch.setattr(compare.runs, "run_cell", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        compare.run_grid(tmp_path, settings, cells)
    first = list(ran)
    assert len(first) == 2

    ran.clear()
    monkeypatch.setattr(
        compare.runs, "run_cell", lambda out, setup, cell: ran.append(cell.key) or real_run_cell(out, setup, cell)
    )
    results = compare.run_grid(tmp_path, settings, cells)
    assert ran == [c.key for c in cells[2:]]  # the killed cell and the ones after it; nothing finished reruns
    assert len(results) == len(cells)
    assert all((tmp_path / "cells" / c.key / "cell.json").is_file() for c in cells)


def test_classifier_grid_shares_the_estimates_head(tmp_path):
    model_dir = make_bert_dir(tmp_path / "bert")
    rows = write_jsonl(tmp_path / "cls.jsonl", CLASS_ROWS)
    settings = compare.GridSettings(
        model=str(model_dir),
        data=str(rows),
        eval_data=str(rows),
        task="classification",
        max_steps=2,
        batch_size=6,
        samples=6,
        targets="query,value",
    )
    cells = compare.grid(compare.parse_methods("lorasb,lora-xs,head", [2]), 1, compare.parse_lrs("1e-2"))
    results = compare.run_grid(tmp_path / "report", settings, cells)
    # Every method starts from the same head (the one the seed's estimate drew), so step-0 losses agree where
    # the init leaves the encoder as it was (LoRA-XS: R ≈ 0; head only).
    step0 = {r.cell["method"]: r.step0_init_loss for r in results}
    assert step0["lora-xs"] == pytest.approx(step0["head"], abs=1e-4)
    assert all("accuracy" in r.metrics for r in results)


def test_option_parsing():
    assert compare.parse_methods("lorasb, lora:8/16 ,full", [32]) == [
        ("lorasb", 32),
        ("lora", 8),
        ("lora", 16),
        ("full", None),
    ]
    lr = compare.parse_lrs("lorasb=2e-3,lora=2e-4,1e-3")
    assert (lr("lorasb"), lr("lora"), lr("dora")) == (2e-3, 2e-4, 1e-3)
    with pytest.raises(BadInputError, match="did you mean"):
        compare.parse_methods("lorsb", [8])
    with pytest.raises(BadInputError, match="no rank"):
        compare.parse_methods("lora", [])
    with pytest.raises(BadInputError, match="no learning rate"):
        compare.parse_lrs("lora=1e-3")("dora")
    with pytest.raises(BadInputError):
        compare.grid([("lora", 8)], 0, lr)


def test_cli_bad_method_is_one_line_exit_2(tiny_model_dir, qa_file, tmp_path, capsys):
    args = [
        "compare",
        "--model",
        tiny_model_dir,
        "--data",
        qa_file,
        "--eval-data",
        qa_file,
        "--task",
        "perplexity",
        "--methods",
        "lorra",
        "--ranks",
        "2",
        "-o",
        tmp_path / "r",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert "unknown method 'lorra'" in err and len(err.strip().splitlines()) == 1


def test_a_metric_the_task_does_not_declare_is_refused_before_any_cell(tiny_model_dir, qa_file, tmp_path):
    config = compare.CompareConfig(
        model=str(tiny_model_dir),
        data=str(qa_file),
        eval_data=str(qa_file),
        task="gsm8k",
        methods="lora:2",
        metric="vibes",
        out=str(tmp_path / "report"),
    )
    with pytest.raises(BadInputError, match="--metric vibes: task gsm8k reports accuracy, strict_accuracy"):
        compare.compare(config)
    assert not (tmp_path / "report").exists()


def test_a_cell_carries_plug_in_options_and_reads_old_records():
    old = {"method": "noisy", "rank": 2, "seed": 0, "lr": 1e-2, "label": "", "noise_std": 1.0, "samples": None}
    cell = compare.Cell.from_record(old | {"eta": None, "init_scale": None})
    assert cell.options == {"noise_std": 1.0} and cell.key == "noisy-r2-lr0.01-s0"
    assert compare.Cell.from_record(dataclasses.asdict(cell)) == cell
    assert cell.options_of(lambda name: name == "init_scale") == {}


def test_lr_sweep_chooses_each_methods_rate_on_a_validation_slice(tiny_model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 4)  # 48 rows: 16 held out for validation
    config = compare.CompareConfig(
        model=str(tiny_model_dir),
        data=str(rows),
        eval_data=str(rows),
        task="perplexity",
        methods="lora:2",
        seeds=1,
        max_steps=2,
        batch_size=4,
        samples=4,
        lr="1e-2",
        lr_sweep=True,
        out=str(tmp_path / "report"),
    )
    summary = compare.compare(config)
    payload = json.loads((tmp_path / "report" / "results.json").read_text())
    points = payload["lr_sweep"]["lora"]
    assert len(points) >= 5 and [p["lr"] for p in points] == sorted(p["lr"] for p in points)
    best = min(points, key=lambda p: p["loss"])
    # Inside the grid, or at an edge only when the sweep hit its cap.
    assert best not in (points[0], points[-1]) or len(points) == compare.SWEEP_MAX
    assert [cell["cell"]["lr"] for cell in payload["cells"]] == [best["lr"]] and summary.cells == 1
    validation = (tmp_path / "report" / "sweep" / "data" / "validation.jsonl").read_text().splitlines()
    assert len(validation) == 16
    assert (tmp_path / "report" / "sweep.png").read_bytes()[:4] == PNG_MAGIC
    # A rerun reads every point back instead of training again.
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "report" / "sweep").rglob("point.json"))
    compare.compare(config)
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "report" / "sweep").rglob("point.json")) == before


def test_a_budgeted_cell_spends_the_uniform_count_on_its_own_ranks(tiny_model_dir, qa_file, tmp_path):
    uniform = compare.Cell("lorasb", 4, 0, 1e-2)
    budgeted = compare.Cell("lorasb", 4, 0, 1e-2, label="lorasb budgeted", options={"budget_ratio": 1.0})
    results = compare.run_grid(tmp_path, _settings(tiny_model_dir, qa_file), [uniform, budgeted])
    assert results[0].trainable_params == 4 * 4 * 14
    assert 0 < results[1].trainable_params <= results[0].trainable_params
    factors = sorted(p.name for p in (tmp_path / "factors").glob("*.safetensors"))
    assert len(factors) == 2 and any("budget_ratio1.0" in name for name in factors)  # one estimate, two factors


def _result(method: str, seed: int, metrics: dict) -> compare.CellResult:
    cell = compare.Cell(method, 2, seed, 1e-3)
    return compare.CellResult(dataclasses.asdict(cell), metrics, None, None, None, 1, 1.0, 1)


def test_the_table_ranks_by_the_metric_and_direction_the_task_declares():
    # glue-cola: Matthews correlation, where "b" wins though "a" has the higher accuracy.
    cola = [
        _result("a", 0, {"matthews_correlation": 0.10, "accuracy": 0.80, "count": 10}),
        _result("b", 0, {"matthews_correlation": 0.40, "accuracy": 0.70, "count": 10}),
    ]
    rows = compare.aggregate(cola, get_task("glue-cola"))
    assert [(r["method"], r["metric"], r["vs_best"]) for r in rows] == [
        ("a", "matthews_correlation", "n/a"),
        ("b", "matthews_correlation", "best"),
    ]
    # A lower-is-better metric the task declares (perplexity's loss; gsm8k's invalid-answer rate) ranks ascending.
    losses = [_result("a", s, {"loss": 1.0 + s / 100}) for s in range(2)]
    losses += [_result("b", s, {"loss": 2.0 + s / 100}) for s in range(2)]
    assert [r["vs_best"] for r in compare.aggregate(losses, get_task("perplexity"))] == ["best", "below"]
    invalid = [_result("a", 0, {"invalid": 0.5}), _result("b", 0, {"invalid": 0.1})]
    assert [r["vs_best"] for r in compare.aggregate(invalid, get_task("gsm8k"), "invalid")] == ["n/a", "best"]


def test_compare_offers_every_option_of_the_model_and_data_groups():
    import click

    from lorasb_cli import options
    from lorasb_cli.cli import cli

    command = cli.commands["compare"]
    compare_flags = {p.name for p in command.get_params(click.Context(command))}
    groups = {
        f.name for group in (options.ModelOptions, options.TrainingDataOptions) for f in options.cli_fields(group)
    }
    assert groups <= compare_flags


def test_every_cell_stage_gets_the_model_and_data_groups_whole(tiny_model_dir, qa_file, tmp_path):
    settings = _settings(tiny_model_dir, qa_file, system_prompt="Be brief.", allow_pickle=True)
    cell = compare.Cell("lorasb", 2, 0, 1e-2)
    train = compare.runs._train_config(tmp_path, settings, cell, tmp_path / "run")
    estimate = compare.runs._estimate_config(tmp_path, settings, cell)
    for config in (train, estimate):
        assert (config.system_prompt, config.allow_pickle, config.data) == ("Be brief.", True, str(qa_file))


def test_score_steps_score_each_cell_at_its_checkpoints_as_a_learning_curve(tiny_model_dir, qa_file, tmp_path):
    """--score-steps 2 on 4 steps: each cell is scored at its step-2 checkpoint and at the end. The curve's loss is
    evaluate's perplexity loss_per_sample, the same per-sample mean as the run's own eval loss (checked at the end,
    where both exist), so its points compare along the curve."""
    from lorasb_cli.evaluate import EvaluateConfig, evaluate

    settings = _settings(tiny_model_dir, qa_file, max_steps=4, score_steps="2", task="gsm8k", max_new_tokens=4)
    cells = compare.grid(compare.parse_methods("lorasb:2,lora:2", []), 1, compare.parse_lrs("5e-2"))
    results = compare.run_grid(tmp_path, settings, cells)
    for cell, result in zip(cells, results):
        assert [point["step"] for point in result.curve] == [2, 4]
        early, last = result.curve
        assert last["eval_loss"] == result.eval_loss and last["metrics"] == result.metrics
        run = tmp_path / "cells" / cell.key / "run"
        end = evaluate(
            EvaluateConfig(
                model=str(tiny_model_dir),
                adapter=str(run),
                task="perplexity",
                data=str(qa_file),
                out=str(run.parent / "end.json"),
            )
        )
        assert end.metrics["loss_per_sample"] == pytest.approx(last["eval_loss"], rel=1e-4)
        assert early["eval_loss"] > last["eval_loss"]  # 2 more steps at lr 5e-2 on the scored rows
    compare.write_report(tmp_path, settings, results)
    curve = json.loads((tmp_path / "results.json").read_text())["curve"]
    assert [(row["method"], row["step"], row["seeds"]) for row in curve] == [
        ("lorasb", 2, 1),
        ("lora", 2, 1),
        ("lorasb", 4, 1),
        ("lora", 4, 1),
    ]
    assert "## Learning curve" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "curve.png").read_bytes()[:4] == PNG_MAGIC
    for bad in ("4", "0,2", "two"):
        with pytest.raises(BadInputError, match="--score-steps"):
            compare.cells.parse_score_steps(bad, 4)
