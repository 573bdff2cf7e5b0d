"""decompose: orthonormal factors, residual within 1% of the Eckart–Young optimum, exact mode, rank checks."""

from __future__ import annotations

import pytest
import torch
from helpers import artifact_meta

from lorasb_cli import artifacts, decompose, linalg
from lorasb_cli.errors import BadInputError


def _sign_update(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A sign matrix shaped like a real update: sign of a decaying low-rank signal plus noise."""
    g = torch.Generator().manual_seed(seed)
    k = 24
    signal = torch.randn(m, k, generator=g) @ torch.diag(torch.logspace(0, -1.5, k)) @ torch.randn(k, n, generator=g)
    noise = 0.3 * torch.randn(m, n, generator=g)
    return torch.sign(signal + noise)


def _optimal_residual(matrix: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(matrix.double())
    return float(s[rank:].square().sum().sqrt())


@pytest.mark.parametrize(("m", "n", "rank"), [(96, 160, 8), (256, 128, 32), (200, 200, 4)])
def test_randomized_svd_is_orthonormal_and_within_one_percent(m, n, rank):
    delta = _sign_update(m, n) * 1e-5
    b, s, a = linalg.truncated_svd(delta, rank)
    assert b.shape == (m, rank) and s.shape == (rank,) and a.shape == (rank, n)
    torch.testing.assert_close(b.T @ b, torch.eye(rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.eye(rank), atol=1e-5, rtol=0)
    residual = float(torch.linalg.matrix_norm((delta - b @ torch.diag(s) @ a).double()))
    optimum = _optimal_residual(delta, rank)
    assert optimum <= residual * (1 + 1e-6)
    assert residual <= 1.01 * optimum


def test_exact_svd_reaches_the_optimum():
    delta = _sign_update(80, 120)
    b, s, a = linalg.truncated_svd(delta, 6, exact=True)
    residual = float(torch.linalg.matrix_norm((delta - b @ torch.diag(s) @ a).double()))
    assert residual == pytest.approx(_optimal_residual(delta, 6), rel=1e-5)


def _write_update(path, tensors: dict[str, torch.Tensor], eta: float = 2e-5):
    meta = artifact_meta(
        "update",
        base_model={"id": "toy", "fingerprint": "0" * 16},
        targets="all-linear",
        method="lorasb",
        data={"source": "toy"},
        samples=4,
        tokens=40,
        seed=0,
        eta=eta,
        dtype="float32",
    )
    return artifacts.write_artifact(path, {k: v.to(torch.int8) for k, v in tensors.items()}, meta)


def test_decompose_file_writes_factors_with_eta_only_in_r(tmp_path):
    signs = {"layer.q.weight": _sign_update(64, 48, 1), "layer.o.weight": _sign_update(48, 64, 2)}
    _write_update(tmp_path / "u.safetensors", signs, eta=2e-5)
    summary = decompose.decompose(
        decompose.DecomposeConfig.from_options(
            update=str(tmp_path / "u.safetensors"), rank=8, out=str(tmp_path / "f.safetensors")
        )
    )
    factors = artifacts.Artifact(tmp_path / "f.safetensors", kinds=("factors",))
    assert sorted(artifacts.factor_modules(factors)) == ["layer.o", "layer.q"]
    assert factors.fields["rank"] == 8 and factors.fields["eta"] == 2e-5 and factors.fields["init"] == "lorasb"
    b, r, a = (factors.get(f"layer.q.lora_{x}") for x in "BRA")
    assert b.shape == (64, 8) and r.shape == (8, 8) and a.shape == (8, 48)
    # R carries η; B and A are the singular vectors of the sign matrix itself.
    s_exact = torch.linalg.svdvals(signs["layer.q.weight"].float())[:8]
    torch.testing.assert_close(torch.diagonal(r), 2e-5 * s_exact, rtol=1e-3, atol=0)
    assert torch.count_nonzero(r - torch.diag(torch.diagonal(r))) == 0
    # diag(R) cannot tell ΔW from −ΔW; the product can: B·R·A is the rank-8 step of η·signs, not of its negation.
    delta = 2e-5 * signs["layer.q.weight"].double()
    residual = float(torch.linalg.matrix_norm(delta - b.double() @ r.double() @ a.double()))
    assert residual <= 1.01 * _optimal_residual(delta, 8)
    energy = factors.fields["energy"]["layer.q"]
    assert energy == pytest.approx(float(s_exact.square().sum() / signs["layer.q.weight"].square().sum()), rel=1e-3)
    assert sorted(k[0] for k in summary.by_kind()) == ["layer.o", "layer.q"]


def test_same_seed_same_factors(tmp_path):
    _write_update(tmp_path / "u.safetensors", {"w.weight": _sign_update(64, 64)})
    for name in ("a", "b"):
        decompose.decompose(
            decompose.DecomposeConfig.from_options(
                update=str(tmp_path / "u.safetensors"), rank=4, out=str(tmp_path / f"{name}.safetensors"), seed=3
            )
        )
    a, b = artifacts.Artifact(tmp_path / "a.safetensors"), artifacts.Artifact(tmp_path / "b.safetensors")
    for name in a.names:
        assert torch.equal(a.get(name), b.get(name))


@pytest.mark.parametrize("rank", [0, -1, 49])
def test_bad_ranks_name_the_module_and_write_nothing(tmp_path, rank):
    _write_update(tmp_path / "u.safetensors", {"w.weight": _sign_update(64, 48)})
    with pytest.raises(BadInputError) as excinfo:
        decompose.decompose(
            decompose.DecomposeConfig.from_options(
                update=str(tmp_path / "u.safetensors"), rank=rank, out=str(tmp_path / "f.safetensors")
            )
        )
    if rank > 0:
        assert "min(m, n) = 48 of w (64, 48)" in excinfo.value.one_line()
    assert not (tmp_path / "f.safetensors").exists()
