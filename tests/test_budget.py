"""decompose --budget: per-module ranks within Σ r² ≤ budget, spent where the spectrum pays, and a budgeted
adapter that trains, merges and exports to PEFT with the adapter's own logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasb_cli import adapter, artifacts, budget, inspect, merge
from lorasb_cli.cli import main
from lorasb_cli.decompose import DecomposeConfig, decompose
from lorasb_cli.errors import BadInputError
from lorasb_cli.train import TrainConfig, train


def _energy(values: list[float]) -> torch.Tensor:
    """Descending σ² as fractions of a module's energy."""
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    return s / s.sum()


def _signal_and_noise(strong: int, length: int = 64) -> torch.Tensor:
    """`strong` large σ² over a flat noise floor: a module whose update has a low-rank direction."""
    return _energy([50.0] * strong + [1.0] * (length - strong))


@pytest.mark.parametrize("total", [40, 111, 300, 977])
def test_allocation_stays_within_budget_and_bounds_and_leaves_no_step_that_fits(total):
    gen = torch.Generator().manual_seed(total)
    energy = {f"m{i}": _energy(torch.rand(32, generator=gen).pow(4).tolist()) for i in range(7)}
    max_ranks = {m: 8 + i for i, m in enumerate(energy)}
    ranks = budget.allocate_ranks(energy, total, min_rank=2, max_ranks=max_ranks)
    spent = sum(r * r for r in ranks.values())
    assert spent <= total
    assert all(2 <= ranks[m] <= max_ranks[m] for m in energy)
    left = total - spent
    assert all(2 * ranks[m] + 1 > left for m in energy if ranks[m] < max_ranks[m])  # greedy ran to the end


def test_equal_spectra_get_the_uniform_rank():
    energy = {f"m{i}": _signal_and_noise(5) for i in range(6)}
    ranks = budget.allocate_ranks(
        energy, budget.uniform_parameters(8, 6), min_rank=1, max_ranks=dict.fromkeys(energy, 32)
    )
    assert ranks == dict.fromkeys(energy, 8)


def test_more_concentrated_spectra_get_more_rank_and_capture_more_energy():
    energy = {"signal": _signal_and_noise(16), "noise": _energy([1.0] * 64), "some": _signal_and_noise(6)}
    total = budget.uniform_parameters(8, 3)
    ranks = budget.allocate_ranks(energy, total, min_rank=1, max_ranks=dict.fromkeys(energy, 32))
    assert ranks["signal"] > ranks["some"] > ranks["noise"]
    captured = sum(float(energy[m][:r].sum()) for m, r in ranks.items())
    assert captured > sum(float(e[:8].sum()) for e in energy.values())


def test_a_step_that_no_longer_fits_leaves_the_rest_to_a_cheaper_module():
    """`a` captures more per parameter at every rank, but its step 3 → 4 costs 7 and 5 are left: `b`'s step 1 → 2,
    which costs 3, is taken instead of ending the allocation there."""
    energy = {"a": _energy([40, 30, 20, 15, 0.1, 0.1, 0.1, 0.1]), "b": _energy([100] + [1] * 7)}
    ranks = budget.allocate_ranks(energy, 15, min_rank=1, max_ranks=dict.fromkeys(energy, 8))
    assert ranks == {"a": 3, "b": 2}


def test_a_budget_below_the_minimum_ranks_is_refused():
    energy = {"a": _energy([1.0] * 8), "b": _energy([1.0] * 8)}
    with pytest.raises(BadInputError, match="below 18, the count at --min-rank 3"):
        budget.allocate_ranks(energy, 17, min_rank=3, max_ranks=dict.fromkeys(energy, 8))


def _logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs).logits


def test_budgeted_factors_train_merge_and_export_like_the_adapter(
    tiny_model_dir, qa_file, factors_file, tmp_path, capsys
):
    import peft

    update = factors_file.parent / "u.safetensors"  # the conftest update of the tiny Llama
    out = tmp_path / "budgeted.safetensors"
    summary = decompose(
        DecomposeConfig.from_options(update=str(update), rank=4, budget_ratio=1.0, max_rank=12, out=str(out))
    )
    uniform = budget.uniform_parameters(4, len(summary.ranks))
    assert sum(r * r for r in summary.ranks.values()) <= uniform
    assert len(set(summary.ranks.values())) > 1  # the tiny model's modules differ in spectrum
    factors = artifacts.Artifact(out, kinds=("factors",))
    artifacts.factor_modules(factors)  # every module's rank matches rank / rank_pattern
    assert factors.fields["budget"]["uniform_parameters"] == uniform
    assert all(factors.get(f"{m}.lora_R").shape == (r, r) for m, r in summary.ranks.items())
    assert inspect.describe(out)["rank"] == sorted(set(summary.ranks.values()))
    with pytest.raises(SystemExit) as done:
        main(["inspect", str(out)])
    listing = capsys.readouterr().out
    low, high = min(summary.ranks.values()), max(summary.ranks.values())
    assert (
        done.value.code == 0 and f"rank\t{low}–{high}\n" in listing and f"of {uniform:,} (r = 4 everywhere" in listing
    )

    run = tmp_path / "run"
    trained = train(
        TrainConfig.from_options(
            model=str(tiny_model_dir), data=str(qa_file), factors=str(out), out=str(run), max_steps=2, lr=1e-2
        )
    )
    assert trained.trainable_params == sum(r * r for r in summary.ranks.values())
    saved = adapter.load_adapter(run)
    assert {m: f[1].shape[0] for m, f in saved.factors.items()} == summary.ranks

    inputs = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    adapter.inject(model, saved.factors, scale=saved.scale)
    expected = _logits(model, inputs)
    merged_dir = merge.merge(merge.MergeConfig(adapter=str(run), out=str(tmp_path / "hf"), format="hf"))
    merged = _logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), inputs)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    peft_dir = merge.merge(merge.MergeConfig(adapter=str(run), out=str(tmp_path / "peft"), format="peft"))
    assert json.loads((peft_dir / "adapter_config.json").read_text())["rank_pattern"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    exported = _logits(peft.PeftModel.from_pretrained(base, str(peft_dir)).eval(), inputs)
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget": 100, "budget_ratio": 1.0}, "--budget and --budget-ratio both set the budget"),
        ({"max_rank": 8}, "--max-rank applies with a budget only"),
        ({"budget": 0}, "--budget 0 must be a finite number ≥ 1"),
        ({"budget": 3}, "is below 14, the count at --min-rank 1"),
    ],
)
def test_bad_budgets_are_one_line_errors_and_write_nothing(factors_file, tmp_path, options, message):
    out = tmp_path / "f.safetensors"
    with pytest.raises(BadInputError, match=message):
        decompose(
            DecomposeConfig.from_options(
                update=str(factors_file.parent / "u.safetensors"), rank=4, out=str(out), **options
            )
        )
    assert not out.exists()


def test_a_budget_alone_sets_the_reference_rank_and_the_bounds(factors_file, tmp_path):
    """--budget without --rank: the reference rank is the one the budget affords everywhere, and no module's rank
    passes what the budget leaves it or min(m, n)."""
    update = factors_file.parent / "u.safetensors"
    modules = len(artifacts.Artifact(update).names)
    out = tmp_path / "f.safetensors"
    summary = decompose(DecomposeConfig.from_options(update=str(update), budget=9 * modules + 5, out=str(out)))
    assert artifacts.Artifact(out).meta.budget["uniform_rank"] == 3
    assert sum(r * r for r in summary.ranks.values()) <= 9 * modules + 5
    assert max(summary.ranks.values()) <= 12  # 4 × the reference rank
    with pytest.raises(BadInputError, match="decompose needs --rank"):
        decompose(DecomposeConfig.from_options(update=str(update), out=str(out)))
    with pytest.raises(BadInputError, match="--budget-ratio is a fraction of the count at --rank"):
        decompose(DecomposeConfig.from_options(update=str(update), budget_ratio=1.0, out=str(tmp_path / "g")))
