"""train --lr auto: the range test picks a rate that trains below where the loss diverges, puts the model back as
it was, holds out one slice with --init-scale auto, and a resumed run keeps its rate; compare takes `auto`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import QA_ROWS, make_llama, train_config, write_jsonl

from lorasb_cli import adapter, compare, data, loss, lr_range, methods, train
from lorasb_cli.errors import BadInputError


def _tiny_problem():
    """The tiny Llama with only its output layer trainable (a block's output is normalized before the logits: it
    would never diverge), 8 training rows and 4 probe rows."""
    model, tokenizer = make_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    examples = data.encode(QA_ROWS, "prompt-response", tokenizer, 512, None, "alpaca")
    batches = list(data.make_batches(examples[:8], 4, tokenizer.pad_token_id))
    return model, batches, lambda: loss.mean_loss(model, examples[8:], 4, tokenizer.pad_token_id)


def _train_steps(model, batches, probe, lr: float, steps: int) -> float:
    """The probe loss after `steps` AdamW steps decaying linearly from `lr`, as train's schedule does (the
    reference the pick is judged by)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * (1 - step / steps)
        model.train()
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return probe()


def test_range_test_picks_a_rate_below_divergence_that_trains_and_restores_the_model():
    model, batches, probe = _tiny_problem()
    weight = model.lm_head.weight
    before, rng = weight.detach().clone(), torch.get_rng_state()
    result = lr_range.range_test(model, batches, probe, steps=10, low=1e-4)
    assert torch.equal(weight, before) and weight.grad is None and not model.training
    assert torch.equal(torch.get_rng_state(), rng)  # the run's data order and dropout draw as without the test
    assert result.rates == pytest.approx([1e-4 * 10 ** (4 * k / 9) for k in range(len(result.rates))])
    diverged = result.losses[-1]
    assert not math.isfinite(diverged) or diverged > lr_range.DIVERGED * min(result.start_loss, *result.losses[:-1])
    lowest = min(range(len(result.losses)), key=result.losses.__getitem__)
    assert result.lr == result.rates[lowest] and result.lr < result.rates[-1]
    assert result.start_loss == pytest.approx(probe())
    # The pick trains: 5 steps at it lower the probe loss; at the rate the test stopped at they raise it.
    start = probe()
    assert _train_steps(model, batches, probe, result.lr, 5) < start
    weight.data.copy_(before)
    assert not _train_steps(model, batches, probe, result.rates[-1], 5) < start


def test_pick_is_the_lowest_loss_and_without_any_gain_the_lowest_rate():
    assert lr_range.pick([1e-5, 1e-4, 1e-3], [2.0, 2.5, 9.0], start=2.0) == 1e-5
    assert lr_range.pick([1e-5, 1e-4, 1e-3], [1.9, 1.5, math.nan], start=2.0) == 1e-4


@pytest.mark.parametrize(
    ("lr", "init_scale", "held"),
    [("auto", "auto", 4), ("auto", 1.0, 4), (1e-3, "auto", 4), (1e-3, 1.0, 0)],
)
def test_lr_auto_and_init_scale_auto_hold_out_one_slice(tiny_model_dir, factors_file, tmp_path, lr, init_scale, held):
    from transformers import AutoTokenizer

    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS * 4)  # 48 rows: a slice of 48 // 10
    config = train_config(
        tiny_model_dir, rows, tmp_path / "run", factors=factors_file, lr=lr, init_scale=init_scale, max_length=512
    )
    method = methods.get_method("lorasb")
    inputs = train._read_inputs(config, method, method.resolve_options(config.method_options))
    examples = train._examples(config, inputs, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert len(examples.train) == 48 - held and len(examples.held_out or []) == held


@pytest.mark.slow  # three tiny runs and a range test
def test_train_lr_auto_records_its_rate_and_a_resumed_run_trains_on_with_it(
    tiny_model_dir, qa_file, factors_file, tmp_path, monkeypatch
):
    from transformers import TrainerCallback

    class CrashAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("crash")

    settings = {"factors": factors_file, "max_steps": 4, "init_scale": "auto"}
    auto = tmp_path / "auto"
    with pytest.raises(RuntimeError, match="crash"):
        train.train(train_config(tiny_model_dir, qa_file, auto, lr="auto", **settings), callbacks=[CrashAtStep3()])
    curve = json.loads((auto / lr_range.CURVE_FILE).read_text())
    assert (auto / lr_range.PLOT_FILE).stat().st_size > 0 and len(curve["rates"]) == len(curve["losses"]) > 1
    assert curve["lr"] in curve["rates"][:-1]  # below the rate the test stopped at

    def no_second_test(*args, **kwargs):
        raise AssertionError("--resume ran the range test again")

    monkeypatch.setattr(lr_range, "range_test", no_second_test)
    train.train(train_config(tiny_model_dir, qa_file, auto, lr="auto", resume=True, **settings))
    recorded = adapter.load_adapter(auto).meta
    assert recorded.train["lr"] == "auto" and recorded.lr_auto == curve["lr"]
    # The same run with the picked rate as a number: the test left the initialization and data order untouched.
    number = tmp_path / "number"
    train.train(train_config(tiny_model_dir, qa_file, number, lr=curve["lr"], **settings))
    for module, (_, lora_R, _) in adapter.load_adapter(number).factors.items():
        assert torch.equal(adapter.load_adapter(auto).factors[module][1], lora_R)


def test_lr_takes_auto_or_a_positive_number():
    assert train.TrainConfig.from_options(model="m", data="d", out="o", lr="auto").lr == "auto"
    assert train.TrainConfig.from_options(model="m", data="d", out="o", lr="2e-3").lr == 2e-3
    for bad in (0, "fast"):
        with pytest.raises(BadInputError, match=f"--lr {bad} must be a finite number > 0 or auto"):
            train.TrainConfig.from_options(model="m", data="d", out="o", lr=bad)


def test_compare_takes_auto_per_method_and_refuses_it_with_a_sweep(tiny_model_dir, qa_file, tmp_path):
    lr = compare.parse_lrs("lorasb=auto,1e-3")
    assert (lr("lorasb"), lr("lora")) == ("auto", 1e-3)
    cells = compare.grid([("lorasb", 2), ("lora", 2)], 1, lr)
    assert [c.key for c in cells] == ["lorasb-r2-lrauto-s0", "lora-r2-lr0.001-s0"]
    settings = compare.GridSettings(model=str(tiny_model_dir), data=str(qa_file), eval_data=str(qa_file), task="x")
    compare.runs.check_cells(tmp_path, settings, cells)  # each cell's train config takes its lr
    assert compare.runs._train_config(tmp_path, settings, cells[0], tmp_path / "run").lr == "auto"
    config = compare.CompareConfig(
        model=str(tiny_model_dir), data=str(qa_file), task="gsm8k", methods="lora:2", lr="auto", lr_sweep=True, out="o"
    )
    with pytest.raises(BadInputError, match="--lr-sweep sweeps around a number"):
        compare.compare(config)
