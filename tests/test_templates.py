"""Prompt templates and the exact prompt/response boundary on real tokenizers: SentencePiece (Mistral-7B's own),
WordPiece (BERT), byte-level BPE, and the bundled SmolLM2 (slow); the ids `evaluate` feeds are captured from
`ModelAnswerer.generate` itself."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import make_bert_dir, make_mistral, make_tokenizer
from torch import nn

from lorasb_cli import data, templates
from lorasb_cli.errors import BadInputError
from lorasb_cli.tasks import get_task, runner

CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def gsm_rows(count: int, seed: int = 0) -> list[dict]:
    """Generated GSM8K-style rows with responses that start in every way a boundary can go wrong: a word, a
    digit, a space, punctuation, a newline, non-ASCII."""
    rng = random.Random(seed)
    starts = ["The answer is: ", "", " ", "(", "\n", "Étape 1: ", "12 + 30 = ", "So", "- "]
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        question = (
            f"Natalia sold {a} clips in April and {b} in May. How many clips did she sell{rng.choice(['?', '', ' ?'])}"
        )
        answer = f"{rng.choice(starts)}{a} + {b} = {a + b}. #### {a + b}"
        rows.append({"question": question, "answer": answer})
    return rows


class _Recorder(nn.Module):
    """A stand-in model whose `generate` records the ids it is fed: exactly what evaluate passes a real model."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": None})()
        self.fed: list[list[int]] = []

    def generate(self, input_ids, attention_mask, generation_config):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            self.fed.append([i for i, m in zip(ids, mask) if m])  # left padding removed
        return input_ids


def fed_prompt_ids(tokenizer, template: str, rows: list[dict]) -> list[list[int]]:
    """The prompt ids `lorasb evaluate --task gsm8k` feeds for each row, in row order."""
    recorder = _Recorder()
    answerer = runner.ModelAnswerer(
        recorder, tokenizer, template=template, batch_size=8, max_new_tokens=1, max_length=512
    )
    task = get_task("gsm8k")
    answerer.generate([answerer.template.prompt(*task.prompt(row)) for row in rows])
    # generate sorts prompts by length within batches; match them back by their text
    by_text = {tokenizer.decode(ids): ids for ids in recorder.fed}
    return [
        by_text[tokenizer.decode(answerer.template.prompt_ids(answerer.template.prompt(*task.prompt(row))))]
        for row in rows
    ]


def assert_boundary_exact(tokenizer, template: str, rows: list[dict]) -> None:
    examples = data.encode(rows, "prompt-response", tokenizer, 1024, template=template)
    for row, example, prompt_ids in zip(rows, examples, fed_prompt_ids(tokenizer, template, rows)):
        assert example.input_ids[: len(prompt_ids)] == prompt_ids, row
        assert example.labels[: len(prompt_ids)] == [data.IGNORE] * len(prompt_ids)
        supervised = example.labels[len(prompt_ids) :]
        assert supervised == example.input_ids[len(prompt_ids) :] and supervised[-1] == tokenizer.eos_token_id
        decoded = tokenizer.decode(supervised[:-1])
        assert decoded.strip() == row["answer"].strip(), (decoded, row["answer"])


@pytest.fixture(scope="module")
def mistral_tokenizer():
    tokenizer = make_mistral()[1]
    tokenizer.pad_token = tokenizer.eos_token  # as models.load_model does for a tokenizer without one
    return tokenizer


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_mistral_training_ids_start_with_the_prompt_ids_evaluate_feeds(mistral_tokenizer, template):
    assert_boundary_exact(mistral_tokenizer, template, gsm_rows(200))


def test_mistral_response_starts_as_generation_continues_not_with_a_dummy_prefix(mistral_tokenizer):
    row = {"question": "What is 40 plus 2?", "answer": "The answer is: 42"}
    (example,) = data.encode([row], "prompt-response", mistral_tokenizer, 256, template="alpaca")
    first = example.labels.index(next(label for label in example.labels if label != data.IGNORE))
    tokens = mistral_tokenizer.convert_ids_to_tokens(example.input_ids[first - 1 : first + 2])
    assert tokens == ["<0x0A>", "The", "▁answer"]  # separately tokenized, the response would begin '▁The'
    assert (
        mistral_tokenizer.convert_ids_to_tokens(mistral_tokenizer("The answer", add_special_tokens=False)["input_ids"])[
            0
        ]
        == "▁The"
    )


def test_byte_level_bpe_boundary_is_exact():
    assert_boundary_exact(make_tokenizer(), "alpaca", gsm_rows(200, seed=1))


def test_wordpiece_boundary_is_exact(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_bert_dir(tmp_path / "bert"))
    tokenizer.eos_token = tokenizer.sep_token  # BERT has no EOS; its [SEP] closes a sequence
    rows = [{"question": "oil said", "answer": "profit the market"}, {"question": "the bank", "answer": "oil oil"}]
    examples = data.encode(rows, "prompt-response", tokenizer, 64, template="plain")
    for row, example in zip(rows, examples):
        # WordPiece appends [SEP] to every encoding: the prompt's ids end in it, the joint ids do not have it there,
        # so the boundary falls back to the offsets and still starts with exactly the ids generation is fed.
        prompt_ids = templates.Template("plain", tokenizer).prompt_ids(row["question"])
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        assert tokenizer.decode(example.labels[len(prompt_ids) : -1]) == row["answer"]


@pytest.mark.slow
def test_smollm2_boundary_is_exact():
    from transformers import AutoTokenizer

    from lorasb_cli import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model("smollm2-135m").path)
    assert_boundary_exact(tokenizer, "alpaca", gsm_rows(200, seed=2))
    assert_boundary_exact(tokenizer, "chat", gsm_rows(50, seed=3))


def test_a_prompt_ending_mid_token_keeps_the_prompt_ids_and_the_whole_response(mistral_tokenizer):
    # "Answer:" + "42" merges nothing, but "Answer: " + "42" makes the joint '▁' + '4' differ from the prompt's
    # trailing '▁' on some tokenizers; either way the prompt ids come first and the response text is whole.
    template = templates.Template("plain", mistral_tokenizer)
    for prompt, response in [("Answer: ", "42"), ("Total:", "42"), ("It is abc", "def")]:
        ids, prompt_length, _ = template.encode(prompt, response)
        assert ids[:prompt_length] == template.prompt_ids(prompt)
        assert mistral_tokenizer.decode(ids[prompt_length:-1]).strip() == response


def test_auto_template_follows_trl_dataset_types():
    assert templates.resolve("auto", ["prompt", "completion"]) == "plain"
    assert templates.resolve("auto", ["messages"]) == "chat"
    for fields in (["question", "answer"], ["query", "response"], ["instruction", "input", "output"]):
        assert templates.resolve("auto", fields) == "alpaca"
    assert templates.resolve("plain", ["question", "answer"]) == "plain"
    with pytest.raises(BadInputError, match="did you mean 'alpaca'"):
        templates.resolve("alpacca", ["question", "answer"])


def test_plain_template_trains_the_prompt_exactly_as_given():
    tokenizer = make_tokenizer()
    (example,) = data.encode(
        [{"prompt": "12 plus 30 is", "completion": " 42"}], "prompt-response", tokenizer, 64, template="plain"
    )
    assert tokenizer.decode(example.input_ids, skip_special_tokens=True) == "12 plus 30 is 42"


def test_chat_template_renders_conversations_and_single_prompts():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT
    chat = templates.Template("chat", tokenizer)
    messages = [{"role": "user", "content": "what is 12 plus 30 ?"}, {"role": "assistant", "content": "42"}]
    prompt, response = chat.split({"messages": messages})
    assert prompt == "<s>user\nwhat is 12 plus 30 ?</s>\n<s>assistant\n" and response == "42</s>"
    assert chat.prompt("what is 12 plus 30 ?") == prompt
    (example,) = data.encode([{"messages": messages}], "prompt-response", tokenizer, 64, template="chat")
    prompt_ids = chat.prompt_ids(prompt)
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 2  # no extra BOS
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id and example.input_ids.count(tokenizer.eos_token_id) == 2
    with pytest.raises(BadInputError, match="last of the 'messages' must be the assistant"):
        chat.split({"messages": messages[:1]})
    with pytest.raises(BadInputError, match="need --template chat"):
        templates.Template("alpaca", tokenizer).split({"messages": messages})


def test_chat_needs_a_tokenizer_with_a_chat_template():
    with pytest.raises(BadInputError, match="no chat template"):
        templates.Template("chat", make_tokenizer())


def test_a_different_template_than_recorded_is_refused_unless_forced(caplog):
    with pytest.raises(BadInputError, match="template plain differs from the template alpaca that training used"):
        templates.check_same("alpaca", "plain", "training", force=False)
    templates.check_same("alpaca", "plain", "training", force=True)
    assert "--force-template" in caplog.text
    templates.check_same(None, "plain", "training", force=False)


def test_non_text_fields_are_refused_with_the_field_named():
    with pytest.raises(BadInputError, match="field 'answer' is null"):
        templates.Template("alpaca", None).split({"question": "q", "answer": None})
    with pytest.raises(BadInputError, match=r"field 'question' must be text, not an object \(\{'x': 1\}\)"):
        templates.Template("alpaca", None).split({"question": {"x": 1}, "answer": "a"})


def test_one_resolution_serves_every_format_and_one_default_every_prompt():
    """templates.resolve is what estimate, train and evaluate call: formats without a prompt get no template, and
    prompts of data that named none (text rows scored on a generation task) use templates.DEFAULT."""
    assert templates.resolve("auto", ["text"], "text") is None
    assert templates.resolve("chat", ["text", "label"], "classification") is None
    assert templates.resolve("auto", ["instruction", "output"], "prompt-response") == templates.DEFAULT == "alpaca"
    unnamed = templates.Template(None, None)
    assert unnamed.name == "alpaca" and unnamed.prompt("Add 1 and 2.") == templates.ALPACA.format(
        instruction="Add 1 and 2."
    )
