"""decompose --init: each init's defining property on a real estimated update (or the tiny model's W0)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from lorasb_cli import artifacts, cli, estimate, inits
from lorasb_cli.decompose import DecomposeConfig, decompose
from lorasb_cli.errors import BadInputError
from lorasb_cli.registry import did_you_mean

RANK = 4


@pytest.fixture(scope="module")
def update_file(tiny_model_dir, qa_file, tmp_path_factory):
    """A real sign update ΔW = −η·sign(G) of the tiny model (14 modules, η = 1e-5)."""
    path = tmp_path_factory.mktemp("inits") / "u.safetensors"
    estimate.estimate(estimate.EstimateConfig(model=str(tiny_model_dir), data=str(qa_file), out=str(path), samples=8))
    return path


@pytest.fixture(scope="module")
def deltas(update_file) -> dict[str, torch.Tensor]:
    """{module: ΔW_avg} in float64: η times the stored int8 signs, read by hand (not through the reader decompose
    uses, so a sign or scale lost there shows here)."""
    with safe_open(str(update_file), framework="pt") as f:
        eta = json.loads(f.metadata()["lorasb"])["eta"]
        names = list(f.keys())  # safe_open is not iterable
        return {name.removesuffix(".weight"): eta * f.get_tensor(name).double() for name in names}


@pytest.fixture(scope="module")
def base_weights(tiny_model_dir) -> dict[str, torch.Tensor]:
    """{module: W0} in float64 of every linear layer, from the model as transformers loads it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return {n: m.weight.detach().double() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _decompose(update_file, tmp_path, name: str, **kwargs):
    """Run decompose into tmp_path/name.safetensors; returns (artifact, {module: (B, R, A) float64})."""
    out = tmp_path / f"{name}.safetensors"
    decompose(
        DecomposeConfig.from_options(
            update=str(update_file) if update_file is not None else None,
            rank=kwargs.pop("rank", RANK),
            out=str(out),
            **kwargs,
        )
    )
    loaded = artifacts.load_factors(str(out))
    return artifacts.Artifact(out), {m: tuple(t.double() for t in triple) for m, triple in loaded.factors.items()}


def _projector(matrix: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the column space of `matrix` [m, r] (full column rank)."""
    q, _ = torch.linalg.qr(matrix.double())
    return q @ q.T


def _overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cos² of the principal angles between the column spaces of x and y (1: same space, ~r/m: random)."""
    qx, qy = torch.linalg.qr(x.double())[0], torch.linalg.qr(y.double())[0]
    return float((qx.T @ qy).square().sum() / x.shape[1])


def _truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def _optimal_residual(matrix: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(matrix.double())
    return float(s[rank:].square().sum().sqrt())


def _assert_orthonormal(lora_B: torch.Tensor, lora_A: torch.Tensor, module: str) -> None:
    eye = torch.eye(lora_B.shape[1], dtype=torch.float64)
    torch.testing.assert_close(lora_B.T @ lora_B, eye, atol=1e-4, rtol=0, msg=f"BᵀB ≠ I in {module}")
    torch.testing.assert_close(lora_A @ lora_A.T, eye, atol=1e-4, rtol=0, msg=f"AAᵀ ≠ I in {module}")


def test_registry_holds_the_five_inits_with_their_sources():
    assert {name: init.source for name, init in inits.INITS.items()} == {
        "lorasb": "update",
        "non-orthonormal": "update",
        "kaiming": "update",
        "noisy": "update",
        "lora-xs": "model",
    }
    assert all(init.summary for init in inits.INITS.values())
    assert inits.get_init("lora-xs") is inits.INITS["lora-xs"]


# ---------------------------------------------------------------------------------------------------- lorasb


def test_lorasb_is_orthonormal_and_within_one_percent_of_eckart_young(update_file, deltas, tmp_path):
    artifact, factors = _decompose(update_file, tmp_path, "lorasb")
    assert artifact.fields["init"] == "lorasb" and artifact.fields["scale"] == 1.0 and artifact.fields["rank"] == RANK
    assert artifact.fields["eta"] == 1e-5
    assert set(factors) == set(deltas) and len(factors) == 14
    for module, (lora_B, lora_R, lora_A) in factors.items():
        delta = deltas[module]
        assert lora_B.shape == (delta.shape[0], RANK) and lora_A.shape == (RANK, delta.shape[1])
        _assert_orthonormal(lora_B, lora_A, module)
        # R = diag(S_r): diagonal, non-negative and descending; η lives in R only.
        torch.testing.assert_close(lora_R, torch.diag(torch.diagonal(lora_R)), atol=0, rtol=0)
        s = torch.diagonal(lora_R)
        assert (s >= 0).all() and (s[:-1] >= s[1:]).all(), module
        residual = float(torch.linalg.matrix_norm(delta - lora_B @ lora_R @ lora_A))
        optimum = _optimal_residual(delta, RANK)
        assert optimum * (1 - 1e-6) <= residual <= 1.01 * optimum, module


def test_lorasb_exact_is_the_rank_r_truncation(update_file, deltas, tmp_path):
    artifact, factors = _decompose(update_file, tmp_path, "lorasb", exact=True)
    assert artifact.fields["svd"]["exact"] is True
    for module, (lora_B, lora_R, lora_A) in factors.items():
        delta = deltas[module]
        truncation = _truncation(delta, RANK)
        error = torch.linalg.matrix_norm(lora_B @ lora_R @ lora_A - truncation) / torch.linalg.matrix_norm(truncation)
        assert error < 1e-4, (module, float(error))
        torch.testing.assert_close(torch.diagonal(lora_R), torch.linalg.svdvals(delta)[:RANK], atol=0, rtol=1e-5)
        # The recorded energy is the captured fraction Σσ²(top r)/‖ΔW‖².
        s = torch.linalg.svdvals(delta)
        assert artifact.fields["energy"][module] == pytest.approx(
            float(s[:RANK].square().sum() / s.square().sum()), rel=1e-4
        )


# ------------------------------------------------------------------------------------------- non-orthonormal


def test_non_orthonormal_has_the_same_product_but_b_carries_s(update_file, tmp_path):
    _, reference = _decompose(update_file, tmp_path, "lorasb", exact=True)
    artifact, factors = _decompose(update_file, tmp_path, "non-orthonormal", init="non-orthonormal", exact=True)
    assert artifact.fields["init"] == "non-orthonormal" and artifact.fields["scale"] == 1.0
    eye = torch.eye(RANK, dtype=torch.float64)
    for module, (lora_B, lora_R, lora_A) in factors.items():
        ref_B, ref_R, ref_A = reference[module]
        torch.testing.assert_close(lora_A @ lora_A.T, eye, atol=1e-4, rtol=0)
        torch.testing.assert_close(lora_R, eye, atol=0, rtol=0)
        gram = lora_B.T @ lora_B  # = S_r²: diagonal, and far from I (S_r is of order η·√(mn))
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-4 * float(gram.abs().max()), rtol=0)
        torch.testing.assert_close(torch.diagonal(gram), torch.diagonal(ref_R).square(), atol=0, rtol=1e-4)
        assert float((gram - eye).abs().max()) > 0.5, module
        product, ref_product = lora_B @ lora_R @ lora_A, ref_B @ ref_R @ ref_A
        assert float(torch.linalg.matrix_norm(product - ref_product) / torch.linalg.matrix_norm(ref_product)) < 1e-5


# ---------------------------------------------------------------------------------------------------- lora-xs


def _assert_lora_xs(artifact, factors, base_weights, exact: bool) -> None:
    assert artifact.fields["init"] == "lora-xs" and artifact.fields["scale"] == 1.0 and artifact.fields["rank"] == RANK
    for module, (lora_B, lora_R, lora_A) in factors.items():
        weight = base_weights[module]
        assert lora_B.shape == (weight.shape[0], RANK) and lora_A.shape == (RANK, weight.shape[1])
        assert float(lora_R.abs().max()) < 1e-3 and float(lora_R.abs().max()) > 0, module  # ~N(0, 1e-5²), not 0
        # A = V_rᵀ is orthonormal; B = U_r·S_r is not.
        torch.testing.assert_close(lora_A @ lora_A.T, torch.eye(RANK, dtype=torch.float64), atol=1e-4, rtol=0)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        torch.testing.assert_close(lora_B.norm(dim=0), s[:RANK], atol=0, rtol=1e-2 if not exact else 1e-5)
        residual = float(torch.linalg.matrix_norm(weight - lora_B @ lora_A))
        assert residual <= 1.01 * _optimal_residual(weight, RANK), module
        if exact:  # W0's spectrum is flat: only the exact SVD pins the top-r subspaces down
            left = _projector(lora_B) - u[:, :RANK] @ u[:, :RANK].T
            right = _projector(lora_A.T) - vh[:RANK].T @ vh[:RANK]
            assert float(left.norm()) < 1e-4 and float(right.norm()) < 1e-4, module


@pytest.mark.parametrize("exact", [True, False])
def test_lora_xs_from_the_model_spans_w0_top_subspaces(tiny_model_dir, base_weights, tmp_path, exact):
    artifact, factors = _decompose(None, tmp_path, "xs", init="lora-xs", model=str(tiny_model_dir), exact=exact)
    assert artifact.fields["base_model"]["id"] == str(tiny_model_dir) and artifact.fields["targets"] == "all-linear"
    assert artifact.fields["eta"] is None
    assert sorted(factors) == sorted(m for m in base_weights if m != "lm_head")
    _assert_lora_xs(artifact, factors, base_weights, exact)


def test_lora_xs_with_an_update_takes_its_modules_and_model(update_file, deltas, base_weights, tmp_path):
    # The model comes from the update's provenance when --model is not given.
    artifact, factors = _decompose(update_file, tmp_path, "xs", init="lora-xs", exact=True)
    assert set(factors) == set(deltas)
    assert artifact.fields["eta"] == 1e-5 and artifact.fields["samples"] == 8
    _assert_lora_xs(artifact, factors, base_weights, exact=True)


def test_lora_xs_with_narrow_targets(tiny_model_dir, base_weights, tmp_path):
    artifact, factors = _decompose(
        None, tmp_path, "xs-q", init="lora-xs", model=str(tiny_model_dir), targets="q_proj", exact=True
    )
    assert sorted(factors) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert artifact.fields["targets"] == "q_proj"
    _assert_lora_xs(artifact, factors, base_weights, exact=True)


# ---------------------------------------------------------------------------------------------------- kaiming


def test_kaiming_is_orthonormal_as_large_as_the_update_but_in_other_subspaces(update_file, deltas, tmp_path):
    _, reference = _decompose(update_file, tmp_path, "lorasb")
    artifact, factors = _decompose(update_file, tmp_path, "kaiming", init="kaiming")
    assert artifact.fields["init"] == "kaiming" and artifact.fields["scale"] == 1.0
    left, right = [], []
    for module, (lora_B, lora_R, lora_A) in factors.items():
        delta_norm = float(torch.linalg.matrix_norm(deltas[module]))
        _assert_orthonormal(lora_B, lora_A, module)
        # The random matrix is scaled to ‖ΔW‖: its top-r part is a sizeable fraction of that, never more.
        size = float(torch.linalg.matrix_norm(lora_B @ lora_R @ lora_A))
        assert 0.2 * delta_norm < size <= delta_norm * (1 + 1e-5), (module, size / delta_norm)
        ref_B, ref_R, ref_A = reference[module]
        assert 0.3 < size / float(torch.linalg.matrix_norm(ref_R)) <= 1.5, module
        left.append(_overlap(lora_B, ref_B))
        right.append(_overlap(lora_A.T, ref_A.T))
    # Random r-dim subspaces of R^m overlap ~r/m; LoRA-SB's with itself would give 1.
    assert max(left + right) < 0.5 and sum(left) / len(left) < 0.25 and sum(right) / len(right) < 0.25


def test_kaiming_is_fixed_by_the_seed(update_file, tmp_path):
    _, first = _decompose(update_file, tmp_path, "k0", init="kaiming", seed=0)
    _, again = _decompose(update_file, tmp_path, "k0b", init="kaiming", seed=0)
    _, other = _decompose(update_file, tmp_path, "k1", init="kaiming", seed=1)
    module = next(iter(first))
    assert all(torch.equal(a, b) for a, b in zip(first[module], again[module]))
    assert _overlap(first[module][0], other[module][0]) < 0.9


# ------------------------------------------------------------------------------------------------------ noisy


def test_noisy_with_zero_noise_is_lorasb(update_file, tmp_path):
    _, reference = _decompose(update_file, tmp_path, "lorasb", exact=True, seed=3)
    artifact, factors = _decompose(update_file, tmp_path, "noisy0", init="noisy", noise_std=0.0, exact=True, seed=3)
    assert artifact.fields["init"] == "noisy" and artifact.fields["noise_std"] == 0.0
    for module, triple in factors.items():
        for got, want in zip(triple, reference[module]):
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-6)


def test_noisy_with_large_noise_moves_the_subspaces(update_file, deltas, tmp_path):
    _, reference = _decompose(update_file, tmp_path, "lorasb", exact=True)
    _, factors = _decompose(update_file, tmp_path, "noisy", init="noisy", noise_std=10.0, exact=True)
    overlaps = []
    for module, (lora_B, lora_R, lora_A) in factors.items():
        _assert_orthonormal(lora_B, lora_A, module)
        ref_B, ref_R, _ = reference[module]
        overlaps.append(_overlap(lora_B, ref_B))
        # σ = 10η per entry: the noise dominates, so the top singular values grow well past ΔW's.
        assert float(lora_R[0, 0]) > 2 * float(ref_R[0, 0]), module
    assert sum(overlaps) / len(overlaps) < 0.5


def test_noisy_needs_a_non_negative_noise_std(update_file, tmp_path):
    with pytest.raises(BadInputError, match="--noise-std"):
        decompose(
            DecomposeConfig.from_options(
                update=str(update_file), rank=RANK, out=str(tmp_path / "a.safetensors"), init="noisy"
            )
        )
    with pytest.raises(BadInputError, match="--noise-std"):
        decompose(
            DecomposeConfig.from_options(
                update=str(update_file), rank=RANK, out=str(tmp_path / "b.safetensors"), init="noisy", noise_std=-1.0
            )
        )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- bad input


def test_unknown_init_suggests_the_closest_name(update_file, tmp_path):
    suggestion = did_you_mean("lorra", sorted(inits.INITS))
    assert suggestion.startswith("did you mean '")
    with pytest.raises(BadInputError, match="unknown --init 'lorra'") as excinfo:
        decompose(
            DecomposeConfig.from_options(
                update=str(update_file), rank=RANK, out=str(tmp_path / "f.safetensors"), init="lorra"
            )
        )
    assert excinfo.value.hint == suggestion and "did you mean" in str(excinfo.value)
    assert not (tmp_path / "f.safetensors").exists()


def test_init_sources_are_checked(update_file, tiny_model_dir, tmp_path):
    out = str(tmp_path / "f.safetensors")
    with pytest.raises(BadInputError, match="--init lora-xs factors the pretrained weights"):
        decompose(DecomposeConfig.from_options(update=None, rank=RANK, out=out, init="lora-xs"))
    with pytest.raises(BadInputError, match="--init kaiming reads no model"):
        decompose(
            DecomposeConfig.from_options(
                update=str(update_file), rank=RANK, out=out, init="kaiming", model=str(tiny_model_dir)
            )
        )
    with pytest.raises(BadInputError, match="--init kaiming factors an update"):
        decompose(DecomposeConfig.from_options(update=None, rank=RANK, out=out, init="kaiming"))
    with pytest.raises(BadInputError, match="--init lorasb reads no model"):
        decompose(DecomposeConfig.from_options(update=str(update_file), rank=RANK, out=out, model=str(tiny_model_dir)))
    assert list(tmp_path.iterdir()) == []


def test_lora_xs_rank_above_min_shape_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(BadInputError, match="exceeds min"):
        decompose(
            DecomposeConfig.from_options(
                update=None, rank=33, out=str(tmp_path / "f.safetensors"), init="lora-xs", model=str(tiny_model_dir)
            )
        )
    assert not (tmp_path / "f.safetensors").exists()


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_lora_xs_prints_the_path(tiny_model_dir, tmp_path):
    out = tmp_path / "f.safetensors"
    result = CliRunner().invoke(
        cli.cli, ["decompose", "--init", "lora-xs", "--model", str(tiny_model_dir), "--rank", "2", "-q", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    loaded = artifacts.load_factors(str(out))
    assert loaded.fields["init"] == "lora-xs" and loaded.fields["rank"] == 2 and len(loaded.factors) == 14


def test_cli_init_typo_is_one_line_and_exit_2(update_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["decompose", str(update_file), "--init", "lorra", "-r", "2", "-q", "-o", str(tmp_path / "f.st")])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert excinfo.value.code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("Error: unknown --init 'lorra'"), err
    assert "did you mean" in lines[0]
    assert not (tmp_path / "f.st").exists()
