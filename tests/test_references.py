"""The core promises checked against references the code under test does not share.

The update's direction against plain `torch.autograd` (G summed one sample at a time, each sample's loss
`F.cross_entropy` over its supervised tokens) with the file's int8 signs and η read by hand through safetensors;
the shared per-sample loss against `F.cross_entropy`; an adapter's logits against the weights W0 + B·R·A set by
hand; batched generation, choice log-likelihoods and perplexity losses against each prompt or row alone through the
model.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import CLASS_ROWS, CORPUS, QA_ROWS, make_bert_dir, make_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasb_cli import adapter, artifacts, data, estimate, loss
from lorasb_cli.decompose import DecomposeConfig, decompose
from lorasb_cli.tasks import runner

ETA = 3e-5
RANK = 4


def _read_by_hand(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of a safetensors file as stored, and its `lorasb` metadata as parsed JSON."""
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())  # safe_open is not iterable
        return {name: f.get_tensor(name) for name in names}, json.loads(f.metadata()["lorasb"])


def _autograd_g(model_dir, rows: list[dict], weights: list[str]) -> dict[str, torch.Tensor]:
    """G = Σ_i ∇_W L_i in float64 by plain autograd: each sample alone (no padding), L_i the mean cross-entropy of
    its supervised tokens (F.cross_entropy), the weights made trainable as any fine-tuning script would."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for name in weights:
        params[name].requires_grad_(True)
    for example in data.encode(rows, "prompt-response", tokenizer, 512):  # the ids training sees (not under test)
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        F.cross_entropy(logits, torch.tensor(example.labels[1:]), ignore_index=data.IGNORE).backward()
    return {name: params[name].grad for name in weights}


@pytest.fixture(scope="module")
def estimated(tiny_model_dir, qa_file, tmp_path_factory):
    """The update of every QA row (12 of 12: the sample is the whole set, whatever its order) at η = 3e-5, its rank-4
    factors, and G by autograd."""
    folder = tmp_path_factory.mktemp("reference")
    update, factors = folder / "u.safetensors", folder / "f.safetensors"
    config = estimate.EstimateConfig(
        model=str(tiny_model_dir), data=str(qa_file), out=str(update), samples=len(QA_ROWS), eta=ETA, dtype="float64"
    )
    estimate.estimate(config)
    decompose(DecomposeConfig.from_options(update=str(update), rank=RANK, out=str(factors)))
    signs, _ = _read_by_hand(update)
    return update, factors, _autograd_g(tiny_model_dir, QA_ROWS, sorted(signs))


def test_update_file_holds_minus_sign_of_the_autograd_gradient_and_eta(estimated):
    update, _, grads = estimated
    signs, meta = _read_by_hand(update)
    assert meta["eta"] == ETA and sorted(signs) == sorted(grads) and len(signs) == 14
    read = artifacts.Artifact(update, kinds=("update",))
    for name, g in grads.items():
        assert signs[name].dtype == torch.int8
        clear = g.abs() > 1e-6 * g.abs().max()  # entries whose sign float rounding cannot flip
        assert clear.float().mean() > 0.99
        assert torch.equal(signs[name][clear], -torch.sign(g[clear]).to(torch.int8)), name
        # ΔW_avg = −η·sign(G) = η·(stored signs), what decompose factors.
        by_hand = ETA * signs[name].double()
        assert torch.equal(artifacts.load_update(read, name), by_hand.float()), name
        assert float((by_hand * g).sum()) < 0, name


def test_factors_product_descends_the_autograd_gradient(estimated):
    """B·R·A is the rank-r step of −η·sign(G): it lowers the loss to first order (⟨B·R·A, G⟩ < 0) and lies within 1%
    of the Eckart–Young optimum of the update built by hand, which a step of the opposite sign cannot."""
    update, factors, grads = estimated
    signs, _ = _read_by_hand(update)
    tensors, meta = _read_by_hand(factors)
    assert meta["rank"] == RANK
    for name, g in grads.items():
        module = name.removesuffix(".weight")
        step = tensors[f"{module}.lora_B"].double() @ tensors[f"{module}.lora_R"].double()
        step = step @ tensors[f"{module}.lora_A"].double()
        delta = ETA * signs[name].double()
        assert float((step * g).sum()) < 0, module
        optimum = float(torch.linalg.svdvals(delta)[RANK:].square().sum().sqrt())
        assert float(torch.linalg.matrix_norm(delta - step)) <= 1.01 * optimum, module


def test_mean_loss_is_the_mean_of_each_samples_cross_entropy():
    """`loss.mean_loss` (padded batches, chunked cross-entropy) against F.cross_entropy on each sample alone; a
    sample with no supervised token counts as 0."""
    model, tokenizer = make_llama()
    examples = data.encode(QA_ROWS[:5], "prompt-response", tokenizer, 512)
    ids = tokenizer(CORPUS[0]).input_ids
    examples.append(data.Example(ids, [data.IGNORE] * len(ids)))
    assert len({len(e.input_ids) for e in examples}) > 2  # the batches pad
    with torch.no_grad():
        per_sample = [
            F.cross_entropy(
                model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1],
                torch.tensor(e.labels[1:]),
                ignore_index=data.IGNORE,
            )
            for e in examples[:-1]
        ]
        expected = float(sum(per_sample)) / len(examples)
        for batch_size in (1, 2, 4):
            got = loss.mean_loss(model, examples, batch_size, tokenizer.pad_token_id)
            assert got == pytest.approx(expected, rel=1e-5), batch_size


def test_an_adapter_changes_the_logits_as_the_weights_w0_plus_bra_set_by_hand():
    """Injected factors with a non-symmetric R on some modules give the logits of the model whose weights are
    W0 + B·R·A (set by hand in its state dict), and those differ from the base's."""
    model, tokenizer = make_llama()
    reference, _ = make_llama()
    ids = torch.tensor([tokenizer(text).input_ids[:16] for text in CORPUS[:2]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    generator = torch.Generator().manual_seed(0)
    factors, state = {}, reference.state_dict()
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        m, n = state[f"{module}.weight"].shape
        lora_B = torch.linalg.qr(torch.randn(m, 3, generator=generator))[0]
        lora_A = torch.linalg.qr(torch.randn(n, 3, generator=generator))[0].T
        lora_R = torch.randn(3, 3, generator=generator)
        factors[module] = (lora_B, lora_R, lora_A)
        state[f"{module}.weight"] += 0.5 * lora_B @ lora_R @ lora_A
    reference.load_state_dict(state)
    adapter.inject(model, factors, scale=0.5)
    with torch.no_grad():
        adapted, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    assert (adapted - base).abs().max() > 1e-2


def test_batched_generation_equals_one_prompt_at_a_time():
    """Prompts of different token lengths batched together answer as each alone (no padding) through
    `model.generate`: the shorter ones are padded where generation cannot see them."""
    model, tokenizer = make_llama()
    prompts = ["the cat sat on the mat and the dog", "what is 12 plus 30 ?", "natalia sold", "the dog sat"]
    assert len({len(tokenizer(p).input_ids) for p in prompts}) == len(prompts)

    def alone(prompt: str) -> str:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    with torch.no_grad():
        expected = [alone(p) for p in prompts]
    for batch_size in (2, 4):
        answerer = runner.ModelAnswerer(model, tokenizer, template="plain", batch_size=batch_size, max_length=256)
        assert answerer.generate(prompts, max_new_tokens=8) == expected, batch_size


def test_loglik_is_the_sum_of_each_choice_tokens_log_probabilities():
    """Choices of different token lengths, scored in one padded batch, against log_softmax on each prompt + choice
    alone: Σ over the choice's tokens of log p(token | everything before it)."""
    model, tokenizer = make_llama()
    prompt, choices = "what is 12 plus 30 ?", [" 42", " the cat sat on the mat", " dog"]
    prompt_ids = tokenizer(prompt).input_ids
    expected = []
    with torch.no_grad():
        for choice in choices:
            ids = tokenizer(prompt + choice).input_ids
            assert ids[: len(prompt_ids)] == prompt_ids  # the choice starts a token of its own
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
            expected.append(sum(float(logprobs[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids))))
    answerer = runner.ModelAnswerer(model, tokenizer, template="plain", batch_size=4, max_length=256)
    assert answerer.loglik(prompt, choices) == pytest.approx(expected, rel=1e-5)


def test_perplexity_losses_batched_with_padding_are_each_rows_alone():
    """evaluate's perplexity losses, rows of different lengths in padded batches, against F.cross_entropy over each
    row's supervised tokens with the row alone through the model (no padding)."""
    model, tokenizer = make_llama()
    rows = QA_ROWS[:5]
    examples = data.encode(rows, "prompt-response", tokenizer, 256, template="plain")
    assert len({len(e.input_ids) for e in examples}) > 1  # padding happens
    expected = []
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].double()
            targets = torch.tensor(e.labels[1:])
            kept = targets != data.IGNORE
            expected.append((float(F.cross_entropy(logits[kept], targets[kept])), int(kept.sum())))
    for batch_size in (1, 2, 5):
        answerer = runner.ModelAnswerer(model, tokenizer, template="plain", batch_size=batch_size, max_length=256)
        got = answerer.losses(rows)
        assert [tokens for _, tokens in got] == [tokens for _, tokens in expected], batch_size
        assert [value for value, _ in got] == pytest.approx([value for value, _ in expected], rel=1e-5), batch_size


def test_classify_answers_each_texts_most_likely_label(tmp_path):
    """A classifier's answers, batched with padding, are the label of the largest logit of each text scored alone."""
    from transformers import AutoModelForSequenceClassification, BertTokenizer

    folder = make_bert_dir(tmp_path / "bert")
    labels = {0: "crude", 1: "earn", 2: "trade"}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, id2label=labels).eval()
    tokenizer = BertTokenizer.from_pretrained(folder)
    texts = [row["text"] for row in CLASS_ROWS[::4]] + ["oil", "profit dividend the market said the bank said"]
    with torch.no_grad():
        expected = [labels[int(model(**tokenizer(text, return_tensors="pt")).logits.argmax())] for text in texts]
    answerer = runner.ModelAnswerer(model, tokenizer, template="plain", batch_size=3, max_length=64)
    assert answerer.classify(texts) == expected
