"""What a newcomer meets first: defaults that fit the model, one template for before and after, and what each
stage says it did."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CLASS_ROWS, make_bert_dir, train_config, write_jsonl

from lorasb_cli import artifacts, cli


def run(args: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


@pytest.fixture(scope="module")
def short_encoder(tmp_path_factory):
    """A 32-position BERT encoder and classification rows longer than 32 tokens."""
    folder = tmp_path_factory.mktemp("short-encoder")
    rows = [{"text": " ".join([row["text"]] * 12), "label": row["label"]} for row in CLASS_ROWS]
    return make_bert_dir(folder / "bert", positions=32), write_jsonl(folder / "long.jsonl", rows)


def test_every_default_max_length_fits_a_32_position_encoder(short_encoder, tmp_path, capsys):
    model, rows = short_encoder
    update, factors, run_dir = tmp_path / "u.safetensors", tmp_path / "f.safetensors", tmp_path / "run"
    code, _, err = run(
        ["estimate", "-m", model, "-d", rows, "--format", "classification", "--samples", 4, "-o", update], capsys
    )
    assert code == 0, err
    assert "--max-length 32" in err  # the cap is said
    assert artifacts.Artifact(update).fields["data"]["max_length"] == 32
    assert run(["decompose", update, "--rank", 2, "-q", "-o", factors], capsys)[0] == 0
    code, _, err = run(["train", "-m", model, "-f", factors, "-d", rows, "--max-steps", 2, "-q", "-o", run_dir], capsys)
    assert code == 0, err
    assert json.loads((run_dir / "adapter_config.json").read_text())["train"]["max_length"] == 32
    results = tmp_path / "results.json"
    code, _, err = run(
        ["evaluate", "-m", model, "-a", run_dir, "-t", "classification", "-d", rows, "-o", results], capsys
    )
    assert code == 0, err
    assert json.loads(results.read_text())["config"]["max_length"] == 32


@pytest.mark.parametrize("stage", ["estimate", "train", "evaluate"])
def test_an_explicit_max_length_past_the_model_is_refused(stage, short_encoder, tmp_path, capsys):
    model, rows = short_encoder
    args = {
        "estimate": ["--format", "classification", "--samples", 4],
        "train": ["--method", "head", "--max-steps", 1],
        "evaluate": ["-t", "classification"],
    }[stage]
    out = tmp_path / ("o.json" if stage == "evaluate" else "o")
    code, stdout, err = run([stage, "-m", model, "-d", rows, *args, "--max-length", 64, "-o", out], capsys)
    assert code == 2
    assert "--max-length 64 is beyond the 32 positions" in err and err.count("\n") == 1
    assert stdout == "" and not out.exists()


def test_frac_on_a_small_file_draws_min_samples_and_says_why(tiny_model_dir, tmp_path, capsys):
    from helpers import QA_ROWS

    rows = write_jsonl(tmp_path / "64.jsonl", [QA_ROWS[i % len(QA_ROWS)] for i in range(64)])
    update = tmp_path / "u.safetensors"
    code, _, err = run(["estimate", "-m", tiny_model_dir, "-d", rows, "-o", update], capsys)  # --frac 0.001
    assert code == 0, err
    assert artifacts.Artifact(update).fields["samples"] == 32
    assert "--frac 0.001 of 64 rows is 1, raised to --min-samples 32" in " ".join(err.split())
    # --samples is taken as given; a --min-samples past the rows draws every row.
    assert run(["estimate", "-m", tiny_model_dir, "-d", rows, "--samples", 3, "-q", "-o", update], capsys)[0] == 0
    assert artifacts.Artifact(update).fields["samples"] == 3
    assert run(["estimate", "-m", tiny_model_dir, "-d", rows, "--min-samples", 100, "-q", "-o", update], capsys)[0] == 0
    assert artifacts.Artifact(update).fields["samples"] == 64


def test_sample_count_floor():
    from lorasb_cli import data

    assert data.sample_count(100_000, frac=0.001, samples=None, min_samples=32)[0] == 100
    assert data.sample_count(5_000, frac=0.001, samples=None, min_samples=32)[0] == 32
    assert data.sample_count(20, frac=0.001, samples=None, min_samples=32) == (
        20,
        "--frac 0.001 of 20 rows is 1, raised to --min-samples 32 (every row)",
    )
    # The floored draw is the first rows of a larger one: raising the floor adds samples, never swaps them.
    small = data.sample_indices(500, frac=0.001, samples=None, seed=4, min_samples=8)
    assert data.sample_indices(500, frac=None, samples=20, seed=4)[:8] == small


def _train_config(tiny_model_dir, qa_file, out, **overrides):
    return train_config(tiny_model_dir, qa_file, out, **{"max_steps": 6} | overrides)


def test_a_finished_run_resumed_with_other_options_is_refused(tiny_model_dir, qa_file, factors_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "-m", tiny_model_dir, "-f", factors_file, "-d", qa_file, "--max-steps", 4, "--save-steps", 2]
    assert run([*args, "-q", "-o", out], capsys)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, err = run([*args[:-4], "--max-steps", 30, "--resume", "-q", "-o", out], capsys)
    assert code == 2 and stdout == ""
    assert "--max-steps 4 → 30" in err and "--init-adapter" in err and err.count("\n") == 1
    assert run([*args, "--lr", 0.5, "--resume", "-o", out], capsys)[0] == 2
    # The same options (another --save-steps is where files go, not how the run trains): nothing to do, exit 0.
    assert run([*args[:-1], 3, "--resume", "-q", "-o", out], capsys)[0] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_resumed_run_reports_its_step0_losses_and_whole_time(tiny_model_dir, qa_file, factors_file, tmp_path):
    from transformers import TrainerCallback

    from lorasb_cli import train

    class CrashAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("crash")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train.train(_train_config(tiny_model_dir, qa_file, out, factors=str(factors_file)), callbacks=[CrashAtStep3()])
    marker = json.loads((out / "checkpoint-2" / "lorasb-complete.json").read_text())
    summary = train.train(_train_config(tiny_model_dir, qa_file, out, factors=str(factors_file), resume=True))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step0_base_loss"] == summary.step0_base_loss == marker["step0_base_loss"] is not None
    assert metrics["step0_init_loss"] == marker["step0_init_loss"] is not None
    assert metrics["seconds"] > marker["seconds"] > 0


def test_init_adapter_starts_a_new_run_from_the_trained_r(tiny_model_dir, qa_file, factors_file, tmp_path):
    from lorasb_cli import adapter, train
    from lorasb_cli.errors import BadInputError

    first = tmp_path / "first"
    train.train(_train_config(tiny_model_dir, qa_file, first, factors=str(factors_file)))
    trained = adapter.load_adapter(first)
    initial = adapter.load_adapter(factors_file)
    # A learning rate too small to move R: the new run's adapter is the trained one, not the factors' R_init.
    second = tmp_path / "second"
    summary = train.train(
        _train_config(tiny_model_dir, qa_file, second, init_adapter=str(first), lr=1e-12, max_steps=2, save_steps=50)
    )
    continued = adapter.load_adapter(second)
    for module, (_, lora_R, _) in trained.factors.items():
        assert not torch.allclose(lora_R, initial.factors[module][1], atol=1e-3)
        torch.testing.assert_close(continued.factors[module][1], lora_R, atol=1e-6, rtol=0)
        torch.testing.assert_close(continued.factors[module][0], trained.factors[module][0], atol=0, rtol=0)
    first_metrics = json.loads((first / "metrics.json").read_text())
    assert summary.step0_init_loss == pytest.approx(first_metrics["final_train_loss"], abs=0.5)  # trained, not R_init
    assert summary.step0_init_loss < first_metrics["step0_init_loss"]
    recorded = continued.fields
    assert recorded["init_adapter"]["path"] == str(first.resolve())
    assert recorded["train"]["max_steps"] == 2 and recorded["init_adapter"]["train"]["max_steps"] == 6
    with pytest.raises(BadInputError, match="--factors and --init-adapter both"):
        train.train(
            _train_config(tiny_model_dir, qa_file, tmp_path / "x", init_adapter=str(first), factors=str(factors_file))
        )


# A chat template that, like SmolLM2's, opens with a default system turn when the conversation has none.
CHAT_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<s>system\nYou are a default bot.</s>\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny Llama whose tokenizer has a chat template, an adapter trained on `messages` rows that share one system
    turn, and question/answer rows to score."""
    from helpers import QA_ROWS, make_llama, save_model

    from lorasb_cli import decompose, estimate, train

    folder = tmp_path_factory.mktemp("chat")
    model, tokenizer = make_llama()
    tokenizer.chat_template = CHAT_WITH_DEFAULT_SYSTEM
    model_dir = save_model(model, tokenizer, folder / "model")
    system = {"role": "system", "content": "You add numbers."}
    rows = [
        {
            "messages": [
                system,
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ]
        }
        for r in QA_ROWS
    ]
    chat_file = write_jsonl(folder / "chat.jsonl", rows)
    update, factors = folder / "u.safetensors", folder / "f.safetensors"
    estimate.estimate(estimate.EstimateConfig(model=str(model_dir), data=str(chat_file), out=str(update), samples=8))
    decompose.decompose(decompose.DecomposeConfig.from_options(update=str(update), rank=4, out=str(factors)))
    run_dir = folder / "run"
    train.train(
        train.TrainConfig.from_options(
            model=str(model_dir), factors=str(factors), data=str(chat_file), out=str(run_dir), max_steps=2, batch_size=4
        )
    )
    return model_dir, run_dir, write_jsonl(folder / "qa.jsonl", QA_ROWS[:4]), update


def test_the_shared_system_turn_is_recorded_in_every_artifact(chat_run):
    _, run_dir, _, update = chat_run
    assert artifacts.Artifact(update).fields["data"]["system_prompt"] == "You add numbers."
    recorded = json.loads((run_dir / "adapter_config.json").read_text())["data"]
    assert (recorded["template"], recorded["system_prompt"]) == ("chat", "You add numbers.")


def test_before_and_after_are_scored_under_one_template(chat_run, tmp_path, capsys):
    model_dir, run_dir, qa, _ = chat_run
    common = ["evaluate", "-t", "gsm8k", "-d", qa, "--max-new-tokens", 4]
    outputs = {
        "before": ["-m", model_dir, "--template-of", run_dir],
        "after": ["-m", model_dir, "-a", run_dir],
        "before, unmatched": ["-m", model_dir],
    }
    results, err = {}, {}
    for name, args in outputs.items():
        out = tmp_path / f"{name}.json"
        code, _, err[name] = run([*common, *args, "-o", out], capsys)
        assert code == 0, err[name]
        results[name] = json.loads(out.read_text())
    assert results["before"]["template"] == results["after"]["template"] == "chat"
    assert results["before"]["system_prompt"] == results["after"]["system_prompt"] == "You add numbers."
    prompts = {
        name: [json.loads(line)["input"] for line in (tmp_path / f"{name}.predictions.jsonl").read_text().splitlines()]
        for name in outputs
    }
    assert prompts["before"] == prompts["after"]
    assert all("You add numbers." in p and "default bot" not in p for p in prompts["after"])
    assert f"template: chat (recorded in {run_dir} (--template-of))" in " ".join(err["before"].split())
    # Without --template-of the base is prompted by its data's fields: another template, and evaluate says so.
    assert results["before, unmatched"]["template"] == "alpaca"
    assert "template: alpaca (picked from the fields answer, question)" in " ".join(err["before, unmatched"].split())


def test_system_prompt_is_a_chat_turn_only(tiny_model_dir, qa_file, tmp_path, capsys):
    code, _, err = run(
        ["estimate", "-m", tiny_model_dir, "-d", qa_file, "--system-prompt", "hi", "-o", tmp_path / "u"], capsys
    )
    assert code == 2 and "--system-prompt is a turn of the chat template, not of alpaca" in err


def test_named_prompt_response_fields_are_plain_pairs():
    from lorasb_cli import templates

    assert templates.resolve("auto", ["prompt", "response"]) == "plain"
    rows = [{"messages": [{"role": "system", "content": s}, {"role": "user", "content": "q"}]} for s in "aab"]
    assert templates.shared_system_turn(rows[:2]) == "a" and templates.shared_system_turn(rows) is None
