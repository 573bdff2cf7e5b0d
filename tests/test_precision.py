"""Every trained tensor is float32 while the base may be bf16 (docs/design.md §5; issue 12, item 7).

In a bf16 weight an AdamW step of lr·O(1) (2e-5 here) is below half a unit in the last place of most entries
(bf16 keeps 8 significant bits: ulp ≈ |w|·2⁻⁷), so it rounds away: the head, DoRA magnitudes, LoRA A/B and a
full fine-tune must train as float32 master weights, with the bf16 base feeding them.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CLASS_ROWS, classifier_factors, make_bert_dir, write_jsonl
from transformers import TrainerCallback

from lorasb_cli import adapter, artifacts, train

LR = 2e-5
STEPS = 3


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision")
    return folder, make_bert_dir(folder / "bert"), write_jsonl(folder / "train.jsonl", CLASS_ROWS)


@pytest.fixture(scope="module")
def lorasb_runs(bert):
    """The factors (float32 estimate of the tiny BERT classifier) and the same LoRA-SB run in bf16 and float32."""
    folder, model_dir, data = bert
    classifier_factors(folder, model_dir, data)
    runs = {}
    for dtype in ("bfloat16", "float32"):
        train.train(
            train.TrainConfig.from_options(
                model=str(model_dir),
                factors=str(folder / "f.safetensors"),
                data=str(data),
                out=str(folder / dtype),
                max_steps=STEPS,
                batch_size=6,
                lr=LR,
                scheduler="constant",
                dtype=dtype,
                device="cpu",
                save_steps=100,
            )
        )
        runs[dtype] = adapter.load_adapter(folder / dtype)
    return artifacts.Artifact(folder / "f.safetensors"), runs


def test_bf16_lorasb_run_updates_every_head_entry_like_float32(lorasb_runs):
    factors, runs = lorasb_runs
    assert factors.fields["head"] == ["classifier.bias", "classifier.weight"]
    for name in factors.fields["head"]:
        start = factors.get(name, torch.float32)
        trained = runs["bfloat16"].extra[name]
        # No entry is left where it started: neither at the float32 start (what the run loads now) nor at its bf16
        # rounding (where a bf16 head starts; 61% of the weight's entries stayed exactly there before the fix).
        assert ((trained != start) & (trained != start.bfloat16().float())).all(), name
        # The update matches the float32 run's. Tolerance: bf16 activations (8 significant bits, relative rounding
        # 2⁻⁹ per op through 2 layers) perturb the gradients by ~1%, and Adam's per-entry normalization keeps that
        # relative size in the update: measured 1.3% (Frobenius), 3.2e-6 worst entry. Allowed: 5% of the update's
        # norm and lr/2 per entry (each AdamW step moves an entry by at most ~lr). A bf16 head misses both: the
        # rounding of its start alone is up to 1.2e-4 per entry, twice the whole 3-step update.
        update, reference = trained - start, runs["float32"].extra[name] - start
        assert float(reference.abs().min()) > 0
        assert float((update - reference).norm()) <= 0.05 * float(reference.norm()), name
        assert float((update - reference).abs().max()) <= LR / 2, name
    for module, (_, lora_R, _) in runs["bfloat16"].factors.items():  # R (float32 before) agrees as well
        start, reference = factors.get(f"{module}.lora_R", torch.float32), runs["float32"].factors[module][1]
        assert float((lora_R - reference).norm()) <= 0.05 * float((reference - start).norm()), module


def _bf16_classifier(model_dir):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(model_dir, num_labels=3, dtype=torch.bfloat16).eval()


def test_load_extra_trains_the_head_in_float32_and_evaluates_it_in_the_base_dtype(bert):
    _, model_dir, _ = bert
    head = {"classifier.weight": 0.02 * torch.randn(3, 32), "classifier.bias": 0.001 * torch.randn(3)}
    ids = torch.tensor([[2, 7, 8, 9, 3]])

    model = _bf16_classifier(model_dir)
    adapter.load_extra(model, head, trainable=False)
    params = dict(model.named_parameters())
    assert {params[n].dtype for n in head} == {torch.bfloat16} and not params["classifier.weight"].requires_grad

    model = _bf16_classifier(model_dir)
    adapter.load_extra(model, head, trainable=True)
    adapter.load_extra(model, head, trainable=True)  # idempotent: one input cast
    params = dict(model.named_parameters())
    for name, tensor in head.items():
        assert params[name].dtype == torch.float32 and params[name].requires_grad
        assert torch.equal(params[name].detach(), tensor), name  # exact: not rounded through bf16
    assert len(model.classifier._forward_pre_hooks) == 1
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16  # the base stays bf16
    logits = model(input_ids=ids).logits  # bf16 pooled output into the float32 head
    assert logits.dtype == torch.float32
    pooled = model.bert(input_ids=ids).pooler_output
    torch.testing.assert_close(logits, pooled.float() @ head["classifier.weight"].T + head["classifier.bias"])


class _Watch(TrainerCallback):
    """At the start: every trainable parameter (dtype and value) and the dtype the base's first query layer outputs;
    at the end: the trainable values again."""

    def __init__(self):
        self.start, self.end, self.output_dtypes, self.bf16 = {}, {}, [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.bf16 = args.bf16
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        query = next(m for n, m in model.named_modules() if n.endswith("layer.0.attention.self.query"))
        query.register_forward_hook(lambda module, inputs, output: self.output_dtypes.append(output.dtype))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "dora", "head", "full"])
def test_every_trained_tensor_is_float32_on_a_bf16_base(method, bert, tmp_path):
    _, model_dir, data = bert
    watch = _Watch()
    summary = train.train(
        train.TrainConfig.from_options(
            model=str(model_dir),
            data=str(data),
            out=str(tmp_path / method),
            method=method,
            rank=None if method in ("full", "head") else 2,
            max_steps=1,
            batch_size=6,
            lr=LR,
            dtype="bfloat16",
            device="cpu",
            save_steps=100,
        ),
        callbacks=[watch],
    )
    assert summary.steps == 1 and summary.final_train_loss is not None and summary.final_train_loss > 0
    start, end = watch.start, watch.end
    assert not {n for n, p in start.items() if p.dtype != torch.float32}
    names = {n.removeprefix("base_model.model."): n for n in start}
    head = {"classifier.weight", "classifier.bias"}
    assert head <= set(names)
    if method == "full":
        assert sum(p.numel() for p in start.values()) == summary.base_params
        assert watch.bf16  # float32 master weights, the forward under bf16 autocast (the Trainer's bf16)
        unmoved = set()
    else:
        # PEFT's own upcast (get_peft_model's autocast_adapter_dtype) covers LoRA A/B and DoRA's magnitude; the head
        # is ours (as with --method head). The frozen base stays bf16 and its layers run in bf16.
        assert not watch.bf16
        kinds = {n.split(".")[-3] for n in set(names) - head}
        lora = {"lora_A", "lora_B"}
        assert kinds == {"lora": lora, "dora": lora | {"lora_magnitude_vector"}, "head": set()}[method]
        unmoved = {n for n in start if ".lora_A." in n}  # no gradient in the first step, while lora_B is 0
    assert watch.output_dtypes and set(watch.output_dtypes) == {torch.bfloat16}
    assert {n for n in start if torch.equal(start[n], end[n])} == unmoved
    for name in head:  # one step of lr 2e-5 moves every head entry (most would round away in bf16)
        assert bool((start[names[name]] != end[names[name]]).all()), name
    assert {t.dtype for t in adapter.load_adapter(tmp_path / method).extra.values()} == {torch.float32}
