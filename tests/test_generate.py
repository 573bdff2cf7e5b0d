"""generate: evaluate's output for the same prompt and adapter, the ways prompts come in and completions go out,
streaming that shows exactly the completion, seeded sampling, and bad input as exit 2."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import pytest
from helpers import make_llama, random_r_adapter, save_model, write_jsonl

from lorasb_cli import cli, evaluate
from lorasb_cli.generate import GenerateConfig, generate
from lorasb_cli.merge import MergeConfig, merge

QUESTION = "What is 12 plus 30?"


@pytest.fixture(scope="module")
def run_dir(factors_file, tmp_path_factory):
    return random_r_adapter(factors_file, tmp_path_factory.mktemp("adapter") / "run")


def lorasb(capsys, monkeypatch, *args: str, stdin: str | io.StringIO = "") -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lorasb ARGS` with `stdin` as its standard input."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
    with pytest.raises(SystemExit) as exited:
        cli.main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_generate_gives_evaluates_output_for_the_same_prompt_and_adapter(
    tiny_model_dir, run_dir, tmp_path, capsys, monkeypatch
):
    data = write_jsonl(tmp_path / "one.jsonl", [{"question": QUESTION, "answer": "#### 42"}])
    common = ["-m", str(tiny_model_dir), "--task", "gsm8k", "--max-new-tokens", "12", "--dtype", "float32"]
    outputs = {}
    for name, applied in (("adapter", ["--adapter", str(run_dir)]), ("base", [])):
        out = tmp_path / f"{name}.json"
        status, _, _ = lorasb(capsys, monkeypatch, "evaluate", *common, *applied, "--data", str(data), "-o", str(out))
        assert status == 0
        (predicted,) = [json.loads(line)["output"] for line in evaluate.predictions_path(out).read_text().splitlines()]
        status, stdout, stderr = lorasb(capsys, monkeypatch, "generate", *common, *applied, "--prompt", QUESTION)
        assert status == 0, stderr
        assert stdout == predicted + "\n"
        assert "template: alpaca (picked from the fields answer, question)" in stderr  # as evaluate's log says
        outputs[name] = predicted
    assert outputs["adapter"] != outputs["base"] and all(outputs.values())
    merged = merge(MergeConfig(adapter=str(run_dir), out=str(tmp_path / "merged")))
    common[1] = str(merged)
    assert lorasb(capsys, monkeypatch, "generate", *common, "--prompt", QUESTION)[:2] == (0, outputs["adapter"] + "\n")


def test_an_adapter_for_another_model_is_exit_2(run_dir, tmp_path, capsys, monkeypatch):
    other = save_model(*make_llama(hidden=32), tmp_path / "other")
    status, stdout, stderr = lorasb(capsys, monkeypatch, "generate", "-m", str(other), "-a", str(run_dir), "-p", "hi")
    assert status == 2 and stdout == "" and "are for a" in stderr


def test_stdin_lines_file_rows_and_json_lines_answer_as_prompts_do(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = ["the cat sat on the", "what is 12 plus 30 ?"]
    common = ["generate", "-m", str(tiny_model_dir), "--max-new-tokens", "6", "--dtype", "float32"]
    rows = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(prompts)])
    status, lines, stderr = lorasb(capsys, monkeypatch, *common, "--file", str(rows), "--json")
    assert status == 0 and "template: plain (nothing recorded: the prompt as given)" in stderr
    answers = [json.loads(line) for line in lines.strip("\n").split("\n")]
    assert [a["prompt"] for a in answers] == prompts and all(a["completion"] for a in answers)
    completions = "".join(a["completion"] + "\n" for a in answers)  # what plain output is
    text = tmp_path / "prompts.txt"
    text.write_text(f"{prompts[0]}\n\n{prompts[1]}\n")
    assert lorasb(capsys, monkeypatch, *common, "-p", prompts[0], "-p", prompts[1])[:2] == (0, completions)
    assert lorasb(capsys, monkeypatch, *common, stdin="\n".join(prompts) + "\n")[:2] == (0, completions)
    assert lorasb(capsys, monkeypatch, *common, "--file", str(text))[:2] == (0, completions)


CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def test_a_bare_prompt_goes_through_the_tokenizers_chat_template_where_it_has_one(tmp_path, capsys, monkeypatch):
    """An instruct model given bare text often answers with its end-of-turn token at once: where nothing recorded
    a template and the tokenizer has a chat template, generate renders the prompt with it, as --template chat does."""
    model, tokenizer = make_llama()
    tokenizer.chat_template = CHAT
    model_dir = save_model(model, tokenizer, tmp_path / "chat-model")
    common = ["generate", "-m", str(model_dir), "-p", QUESTION, "--max-new-tokens", "8", "--dtype", "float32"]
    status, chosen, stderr = lorasb(capsys, monkeypatch, *common)
    assert status == 0 and "template: chat (nothing recorded: the tokenizer's chat template)" in stderr
    assert lorasb(capsys, monkeypatch, *common, "--template", "chat")[:2] == (0, chosen)
    assert lorasb(capsys, monkeypatch, *common, "--template", "plain")[1] != chosen


def test_streaming_writes_exactly_the_completion_cut_at_a_stop_string(tiny_model_dir):
    prompts = ["the cat sat on the", "what is 12 plus 30 ?"]
    config = GenerateConfig(model=str(tiny_model_dir), prompt=tuple(prompts), max_new_tokens=24, dtype="float32")
    full = [done.completion for done in generate(config, prompts)]
    # A word the random model happened to write, with more output after it: a stop string it reaches early.
    stop = next(m[0] for m in re.finditer(r"(?<![a-z])[a-z]{3,}", full[0]) if m.end() < len(full[0]))
    for stream in (None, io.StringIO()):
        stopped = [done.completion for done in generate(dataclasses.replace(config, stop=(stop,)), prompts, stream)]
        assert stopped == [text.split(stop, 1)[0] for text in full] and len(stopped[0]) < len(full[0])
        if stream is not None:
            assert stream.getvalue() == "".join(stopped)
    streamed = io.StringIO()
    assert [done.completion for done in generate(config, prompts, streamed)] == full
    assert streamed.getvalue() == "".join(full)


def test_sampling_is_reproducible_for_a_seed_and_differs_from_greedy(tiny_model_dir):
    prompts = ["the cat sat on the"] * 2

    def completions(**sampling):
        config = GenerateConfig(model=str(tiny_model_dir), max_new_tokens=16, dtype="float32", **sampling)
        return [done.completion for done in generate(config, prompts)]

    greedy = completions()
    hot = completions(temperature=5.0, seed=1)
    assert hot == completions(temperature=5.0, seed=1)
    assert hot[0] == hot[1]  # each prompt is seeded alike: a prompt's sample does not depend on the ones before it
    assert hot != greedy and completions(temperature=5.0, seed=2) != hot


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "content, args, message",
    [
        ("", ["--file", "FILE.jsonl"], "no prompts in"),
        ("\n\n", ["--file", "FILE.txt"], "no prompts in"),
        ('{"question": "hi"}\n', ["--file", "FILE.jsonl"], "line 1 has no 'prompt' text"),
        ("not json\n", ["--file", "FILE.jsonl"], "line 1 is not JSON"),
        (None, [], "no prompt given"),
        (None, ["-p", "x", "--top-p", "0.5"], "--top-p applies to sampling"),
        (None, ["-p", "x", "--task", "perplexity"], "task 'perplexity' is scored by perplexity"),
        (None, ["-p", "x", "--stop", ""], "--stop is empty"),
        (None, ["-p", " "], "--prompt is blank"),
    ],
)
def test_bad_input_is_exit_2_with_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch, content, args, message):
    if content is not None:
        (tmp_path / args[1]).write_text(content)
        args = [args[0], str(tmp_path / args[1])]
    stdin = _Terminal() if not args else ""
    status, stdout, stderr = lorasb(capsys, monkeypatch, "generate", "-m", str(tiny_model_dir), *args, stdin=stdin)
    assert status == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and message in stderr
