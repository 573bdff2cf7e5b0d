"""evaluate: the full loop on a scripted fake generator (known accuracy), adapter vs merged identity, errors."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from helpers import QA_ROWS, artifact_meta, make_llama, write_jsonl

from lorasb_cli import adapter, artifacts, evaluate
from lorasb_cli.errors import BadInputError
from lorasb_cli.merge import MergeConfig, merge
from lorasb_cli.tasks import get_task, runner

GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 1,200 pens; 35 are sold. How many remain?", "answer": "#### 1,165"},
    {"question": "What is 5 minus 8?", "answer": "5 - 8 = -3\n#### -3"},
    {"question": "Half of 9?", "answer": "#### 4.5"},
]


class ScriptedAnswerer:
    """Returns fixed strings, so the accuracy is known exactly."""

    def __init__(self, outputs=(), scores=None):
        self.outputs, self.scores, self.prompts = list(outputs), scores, []

    def generate(self, prompts, max_new_tokens=None, stop=()):
        self.prompts += prompts
        return self.outputs[: len(prompts)]

    def loglik(self, prompt, choices):
        return [self.scores[c] for c in choices]


def test_scripted_generator_gives_exact_accuracy(tmp_path):
    data = write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    outputs = [
        "3 plus 4 is 7. The answer is: 7",
        "1200 - 35 = 1165.\n#### 1,165",
        "The answer is: 3",  # wrong sign
        "So half is $4.50.",  # right, but without an answer marker: invalid under the strict protocol
    ]
    answerer = ScriptedAnswerer(outputs)
    config = evaluate.EvaluateConfig(model="unused", task="gsm8k", data=str(data), out=str(tmp_path / "r.json"))
    summary = evaluate.evaluate(config, answerer=answerer)
    assert summary.metrics["accuracy"] == summary.metrics["strict_accuracy"] == 0.5 and summary.count == 4
    assert summary.metrics["flexible_accuracy"] == 0.75 and summary.metrics["invalid"] == 0.25
    assert answerer.prompts[0].startswith("Below is an instruction") and "Tom has 3 apples" in answerer.prompts[0]
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["task"] == "gsm8k" and results["metrics"]["accuracy"] == 0.5 and results["count"] == 4
    assert results["template"] == "alpaca"  # auto, from the question/answer fields
    assert {"lorasb", "torch", "transformers"} <= set(results["versions"])
    lines = [json.loads(line) for line in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in lines] == [True, True, False, False]
    assert [r["correct/flexible"] for r in lines] == [True, True, False, True]
    assert lines[1] | {"input": None} == {
        "input": None,
        "reference": "1165",
        "output": outputs[1],
        "extracted": "1165",
        "correct": True,
        "extracted/flexible": "1165",
        "correct/flexible": True,
    }


def test_loglik_scoring_picks_the_likeliest_option(tmp_path):
    rows = [
        {"instruction": "Is the sky blue?\n\nAnswer format: true/false", "answer": "true", "task": "boolq"},
        {"instruction": "Is fire cold?\n\nAnswer format: true/false", "answer": "false", "task": "boolq"},
    ]
    data = write_jsonl(tmp_path / "cs.jsonl", rows)
    config = evaluate.EvaluateConfig(
        model="x", task="commonsense", data=str(data), out=str(tmp_path / "r.json"), scoring="loglik"
    )
    summary = evaluate.evaluate(config, answerer=ScriptedAnswerer(scores={"true": -1.0, "false": -2.0}))
    assert summary.metrics["accuracy"] == 0.5


def test_generation_stops_at_a_stop_string_with_the_output_of_a_cut_full_generation():
    """`generate(stop=...)` ends a continuation once it writes a stop string, and what the task scores (the output
    cut before the stop) is what a full-length generation cut there gives, batched or not."""
    model, tokenizer = make_llama()
    new_tokens = []
    full_generate = model.generate

    def counting_generate(**kwargs):
        generated = full_generate(**kwargs)
        new_tokens.append(generated.shape[1] - kwargs["input_ids"].shape[1])
        return generated

    model.generate = counting_generate
    prompts = ["the cat sat on the", "what is 12 plus 30 ?"]
    for batch_size in (1, 2):
        answerer = runner.ModelAnswerer(model, tokenizer, template="plain", batch_size=batch_size, max_length=256)
        full = answerer.generate(prompts, max_new_tokens=24)
        # A word the random model happened to write, with more output after it: a stop string it reaches early.
        stop = next(m[0] for m in re.finditer(r"(?<![a-z])[a-z]{3,}", full[0]) if m.end() < len(full[0]))
        task = dataclasses.replace(get_task("gsm8k"), stop=(stop,))
        new_tokens.clear()
        stopped = answerer.generate(prompts, max_new_tokens=24, stop=task.stop)
        assert [task.cut(o) for o in stopped] == [task.cut(o) for o in full]
        assert stopped[0].endswith(stop) and len(stopped[0]) < len(full[0])
        if batch_size == 1:
            assert new_tokens[0] < 24, new_tokens


def test_unknown_task_and_missing_fields(tmp_path):
    with pytest.raises(BadInputError, match="did you mean 'gsm8k'"):
        evaluate.evaluate(evaluate.EvaluateConfig(model="x", task="gsm8kk", out=str(tmp_path / "r.json")))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(BadInputError, match="needs the fields question, answer; the data lacks question, answer"):
        evaluate.evaluate(
            evaluate.EvaluateConfig(model="x", task="gsm8k", data=str(data), out=str(tmp_path / "r.json"))
        )
    assert not (tmp_path / "r.json").exists()


def test_classification_task_on_a_causal_lm_names_the_auto_class(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": "pos"}])
    config = evaluate.EvaluateConfig(
        model=str(tiny_model_dir), task="classification", data=str(data), out=str(tmp_path / "r.json")
    )
    with pytest.raises(BadInputError, match="AutoModelForSequenceClassification"):
        evaluate.evaluate(config)


@pytest.fixture(scope="module")
def trained_like_adapter(factors_file, tmp_path_factory):
    """An adapter whose R is a random non-symmetric matrix large enough to change the model's outputs."""
    folder = tmp_path_factory.mktemp("adapter")
    loaded = artifacts.load_factors(str(factors_file))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (lora_B, _, lora_A) in loaded.factors.items():
        tensors |= {
            f"{module}.lora_B": lora_B,
            f"{module}.lora_R": torch.randn(4, 4, generator=generator) * 2,
            f"{module}.lora_A": lora_A,
        }
    config = {
        "base_model": loaded.fields["base_model"],
        "targets": "all-linear",
        "rank": 4,
        "scale": 1.0,
        "method": "lorasb",
    }
    return adapter.save_adapter(folder / "run", tensors, artifact_meta("adapter", **config))


def test_adapter_and_merged_model_give_identical_predictions(tiny_model_dir, trained_like_adapter, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS[:6])
    merged = merge(MergeConfig(adapter=str(trained_like_adapter), out=str(tmp_path / "merged")))
    common = {"task": "gsm8k", "data": str(data), "max_new_tokens": 6, "batch_size": 4, "dtype": "float32"}
    unmerged = evaluate.evaluate(
        evaluate.EvaluateConfig(
            model=str(tiny_model_dir), adapter=str(trained_like_adapter), out=str(tmp_path / "a.json"), **common
        )
    )
    folded = evaluate.evaluate(evaluate.EvaluateConfig(model=str(merged), out=str(tmp_path / "m.json"), **common))
    base = evaluate.evaluate(evaluate.EvaluateConfig(model=str(tiny_model_dir), out=str(tmp_path / "b.json"), **common))
    read = lambda p: [json.loads(x)["output"] for x in p.read_text().splitlines()]
    assert read(unmerged.predictions) == read(folded.predictions)
    assert read(unmerged.predictions) != read(base.predictions)  # the adapter changes the model
    assert all(len(o) > 0 for o in read(unmerged.predictions))

    perplexity = {"task": "perplexity", "data": str(data), "dtype": "float32"}
    a = evaluate.evaluate(
        evaluate.EvaluateConfig(
            model=str(tiny_model_dir), adapter=str(trained_like_adapter), out=str(tmp_path / "pa.json"), **perplexity
        )
    )
    m = evaluate.evaluate(evaluate.EvaluateConfig(model=str(merged), out=str(tmp_path / "pm.json"), **perplexity))
    assert a.metrics["loss"] == pytest.approx(m.metrics["loss"], abs=1e-5)


def test_adapter_for_another_model_is_refused(trained_like_adapter, tmp_path):
    from helpers import make_llama, save_model

    other = save_model(*make_llama(hidden=32), tmp_path / "other")
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS[:2])
    from lorasb_cli.errors import IncompatibleArtifactError

    with pytest.raises(IncompatibleArtifactError, match="are for a"):
        evaluate.evaluate(
            evaluate.EvaluateConfig(
                model=str(other),
                adapter=str(trained_like_adapter),
                task="gsm8k",
                data=str(data),
                out=str(tmp_path / "r.json"),
            )
        )


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A tiny BERT with a two-class head, saved as a sequence classifier."""
    from helpers import make_bert_dir
    from transformers import AutoModelForSequenceClassification

    path = make_bert_dir(tmp_path_factory.mktemp("bert-cls"))
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).save_pretrained(path)
    return path


def test_every_task_family_runs_from_the_cli_on_local_files(tiny_model_dir, tiny_classifier, tmp_path, capsys):
    from lorasb_cli import cli
    from lorasb_cli.tasks import task_names

    files = {
        "gsm8k": GSM_ROWS,
        "math": [{"problem": "What is $1/2 + 1/4$?", "solution": "It is $\\boxed{\\frac{3}{4}}$."}],
        "commonsense": [
            {"instruction": "Is water wet?\n\nAnswer format: true/false", "answer": "true", "task": "boolq"}
        ],
        "perplexity": QA_ROWS[:3],
        "classification": [{"text": "oil oil said", "label": "crude"}, {"text": "profit said", "label": "earn"}],
        "glue-sst2": [{"sentence": "profit the market", "label": 1}, {"sentence": "oil said", "label": 0}],
        "glue-mrpc": [{"sentence1": "oil said", "sentence2": "oil the bank", "label": 1}],
    }
    assert {"gsm8k", "math", "commonsense", "perplexity", "classification"} <= set(task_names())
    for task, rows in files.items():
        data = write_jsonl(tmp_path / f"{task}.jsonl", rows)
        model = tiny_classifier if task.startswith(("glue", "classification")) else tiny_model_dir
        out = tmp_path / f"{task}.json"
        with pytest.raises(SystemExit) as excinfo:
            cli.main(
                [
                    "evaluate",
                    "-m",
                    str(model),
                    "--task",
                    task,
                    "--data",
                    str(data),
                    "--max-new-tokens",
                    "4",
                    "-q",
                    "-o",
                    str(out),
                ]
            )
        stdout, stderr = capsys.readouterr()
        assert excinfo.value.code == 0, (task, stderr)
        assert stdout == f"{out}\n"
        results = json.loads(out.read_text())
        assert results["task"] == task and results["count"] == len(rows) and results["metrics"]
        assert len(evaluate.predictions_path(out).read_text().splitlines()) == len(rows)


def test_outputs_and_metrics_do_not_depend_on_batch_size(tiny_model_dir, tmp_path):
    """Prompts of very different token lengths in one batch answer as one at a time: padding never shows."""
    rows = [
        {"question": "What is 1 plus 2?", "answer": "#### 3"},
        {
            "question": "Natalia sold clips to 48 of her friends in April, and half as many in May. How many?",
            "answer": "#### 72",
        },
        {"question": "What is 12 plus 30?", "answer": "#### 42"},
        {"question": "The cat sat on the mat and the dog sat on the log. How many sat?", "answer": "#### 2"},
        {"question": "Half of 9?", "answer": "#### 4.5"},
    ]
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    common = {"model": str(tiny_model_dir), "task": "gsm8k", "data": str(data), "max_new_tokens": 8, "dtype": "float32"}
    runs = [
        evaluate.evaluate(evaluate.EvaluateConfig(batch_size=size, out=str(tmp_path / f"b{size}.json"), **common))
        for size in (1, 4)
    ]
    outputs = [[json.loads(x)["output"] for x in run.predictions.read_text().splitlines()] for run in runs]
    assert outputs[0] == outputs[1] and all(outputs[0])
    assert runs[0].metrics == runs[1].metrics


def test_another_template_than_the_adapters_is_refused_unless_forced(tiny_model_dir, factors_file, tmp_path):
    """The factors (an untrained adapter) were estimated with alpaca: evaluating them with plain is refused, before
    any model loads, unless --force-template; `auto` takes the adapter's own."""
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS[:2])
    common = {
        "model": str(tiny_model_dir),
        "adapter": str(factors_file),
        "task": "gsm8k",
        "data": str(data),
        "max_new_tokens": 2,
        "dtype": "float32",
    }
    with pytest.raises(BadInputError, match="template plain differs from the template alpaca that training used"):
        evaluate.evaluate(evaluate.EvaluateConfig(template="plain", out=str(tmp_path / "refused.json"), **common))
    assert not (tmp_path / "refused.json").exists()
    for template, forced, used in (("plain", True, "plain"), ("auto", False, "alpaca")):
        out = tmp_path / f"{template}.json"
        summary = evaluate.evaluate(
            evaluate.EvaluateConfig(template=template, force_template=forced, out=str(out), **common)
        )
        assert json.loads(out.read_text())["template"] == used
        first = json.loads(summary.predictions.read_text().splitlines()[0])["input"]
        assert first.startswith("Below is an instruction") == (used == "alpaca")
