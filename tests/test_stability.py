"""estimate --report-ranks: the overlap of the halves' top-r subspaces, checked against principal angles, 1 for
identical halves, near r/dim for independent noise; the update it writes is the ordinary one."""

from __future__ import annotations

import pytest
import torch
from helpers import write_jsonl

from lorasb_cli import artifacts, estimate, inspect, stability
from lorasb_cli.cli import main
from lorasb_cli.errors import BadInputError


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))[0]


def test_overlap_is_the_mean_squared_cosine_of_the_principal_angles():
    first, second = _orthonormal(40, 6, 0), _orthonormal(40, 6, 1)
    cosines = torch.linalg.svdvals(first.T @ second)  # cos θ_i of the principal angles
    assert stability.overlap(first, second) == pytest.approx(float(cosines.square().mean()), rel=1e-5)
    assert stability.overlap(first, first) == pytest.approx(1.0, abs=1e-6)
    rotated = first @ _orthonormal(6, 6, 2)  # another basis of the same span
    assert stability.overlap(first, rotated) == pytest.approx(1.0, abs=1e-5)


def _signal(m: int, n: int, seed: int) -> torch.Tensor:
    """A gradient-like sum with a strong rank-4 direction plus noise."""
    g = torch.Generator().manual_seed(seed)
    return 5 * torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) + torch.randn(m, n, generator=g)


def test_identical_halves_overlap_fully_and_independent_noise_near_random():
    same = {"w": _signal(128, 96, 0)}
    report = stability.stability(same, {"w": same["w"].clone()}, [4], niter=4, seed=0)["modules"]["w"]
    assert report["B"][0] == pytest.approx(1.0, abs=1e-3) and report["A"][0] == pytest.approx(1.0, abs=1e-3)

    gen = torch.Generator().manual_seed(1)
    first, second = {"w": torch.randn(256, 128, generator=gen)}, {"w": torch.randn(256, 128, generator=gen)}
    report = stability.stability(first, second, [8], niter=4, seed=0)["modules"]["w"]
    assert report["random_B"] == [8 / 256] and report["random_A"] == [8 / 128]
    assert report["B"][0] == pytest.approx(8 / 256, rel=0.5) and report["A"][0] == pytest.approx(8 / 128, rel=0.5)


def test_ranks_above_a_modules_size_are_left_out_for_it_and_parsed_from_auto():
    shapes = {"small": (6, 40), "big": (64, 96)}
    assert stability.parse_ranks("auto", shapes) == [8, 16, 32, 64]
    assert stability.parse_ranks("32, 4,32", shapes) == [4, 32]
    for bad in ("0", "65", "x", ""):
        with pytest.raises(BadInputError, match="--report-ranks"):
            stability.parse_ranks(bad, shapes)
    sums = {name: torch.randn(*shape) for name, shape in shapes.items()}
    report = stability.stability(sums, {k: v.clone() for k, v in sums.items()}, [4, 8], niter=2, seed=0)
    assert report["modules"]["small"]["ranks"] == [4] and report["modules"]["big"]["ranks"] == [4, 8]
    kinds = {(kind, rank) for kind, rank, *_ in stability.by_kind(report)}
    assert kinds == {("small", 4), ("big", 4), ("big", 8)}


def test_estimate_reports_the_halves_and_writes_the_ordinary_update(tiny_model_dir, qa_file, tmp_path, capsys):
    def run(out, **options):
        return estimate.estimate(
            estimate.EstimateConfig(
                model=str(tiny_model_dir), data=str(qa_file), out=str(tmp_path / out), samples=8, **options
            )
        )

    plain, halved = run("plain.safetensors"), run("halved.safetensors", report_ranks="2,4")
    assert halved.stability["samples"] == [4, 4] and halved.samples == plain.samples == 8
    assert halved.tokens == plain.tokens
    meta = artifacts.Artifact(tmp_path / "halved.safetensors").fields["stability"]
    assert meta["ranks"] == [2, 4] and len(meta["modules"]) == plain.modules
    assert all(0 <= v <= 1 + 1e-6 for entry in meta["modules"].values() for v in entry["B"] + entry["A"])
    a, b = artifacts.Artifact(tmp_path / "plain.safetensors"), artifacts.Artifact(tmp_path / "halved.safetensors")
    differing = sum(int((a.get(n) != b.get(n)).sum()) for n in a.names)  # a sum's order moves G's last bits only
    assert differing <= 1e-3 * sum(a.get(n).numel() for n in a.names)

    with pytest.raises(SystemExit) as done:
        main(["inspect", str(tmp_path / "halved.safetensors")])
    listing = capsys.readouterr().out
    assert done.value.code == 0 and "modules\tr\toverlap\tlowest\trandom\n" in listing


def test_report_ranks_refuses_a_raw_shard(tiny_model_dir, qa_file, tmp_path):
    config = estimate.EstimateConfig(
        model=str(tiny_model_dir), data=str(qa_file), out=str(tmp_path / "u.safetensors"), raw=True, report_ranks="4"
    )
    with pytest.raises(BadInputError, match="a --raw shard holds one part"):
        estimate.estimate(config)
    assert not (tmp_path / "u.safetensors").exists()


def _auto(model_dir, data, out, **options):
    return estimate.estimate(
        estimate.EstimateConfig(
            model=str(model_dir), data=str(data), out=str(out), samples="auto", batch_size=4, rank=2, **options
        )
    )


def test_samples_auto_stops_early_on_a_consistent_direction_and_later_on_noise(tiny_model_dir, tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", [{"question": "What is 2 plus 2?", "answer": "4"}] * 64)
    gen = torch.Generator().manual_seed(0)
    words = ["oil", "tariff", "seven", "blue", "run", "the", "of", "profit", "x", "banana", "42", "why"]
    noisy = [
        {"question": " ".join(words[i] for i in torch.randint(0, 12, (6,), generator=gen)), "answer": words[k % 12]}
        for k in range(64)
    ]
    noisy = write_jsonl(tmp_path / "noisy.jsonl", noisy)
    early = _auto(tiny_model_dir, same, tmp_path / "same.safetensors", threshold=0.95, max_samples=64)
    late = _auto(tiny_model_dir, noisy, tmp_path / "noisy.safetensors", threshold=0.95, max_samples=64)
    assert early.samples == 8 and early.samples_auto["reached"]  # the second estimate already agrees
    assert [p["samples"] for p in early.samples_auto["curve"]] == [4, 8]
    assert late.samples > early.samples and len(late.samples_auto["curve"]) > 2
    meta = artifacts.Artifact(tmp_path / "noisy.safetensors").meta
    assert meta.samples == late.samples == meta.data.drawn and meta.samples_auto["curve"]


def test_samples_auto_settles_on_the_draw_of_samples_n(tiny_model_dir, qa_file, tmp_path):
    auto = _auto(tiny_model_dir, qa_file, tmp_path / "auto.safetensors", threshold=0.5, max_samples=12)
    fixed = estimate.estimate(
        estimate.EstimateConfig(
            model=str(tiny_model_dir),
            data=str(qa_file),
            out=str(tmp_path / "fixed.safetensors"),
            samples=auto.samples,
            batch_size=4,
        )
    )
    assert fixed.tokens == auto.tokens
    a, b = artifacts.Artifact(tmp_path / "auto.safetensors"), artifacts.Artifact(tmp_path / "fixed.safetensors")
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"raw": True}, "drop --raw"),
        ({"report_ranks": "4"}, "drop --report-ranks"),
        ({"threshold": 1.5}, r"--threshold 1.5 must be a finite number in \(0, 1\]"),
    ],
)
def test_samples_auto_refuses_what_it_cannot_settle(tiny_model_dir, qa_file, tmp_path, options, message):
    with pytest.raises(BadInputError, match=message):
        _auto(tiny_model_dir, qa_file, tmp_path / "u.safetensors", **options)
    assert not (tmp_path / "u.safetensors").exists()


def test_inspect_plot_draws_an_update_and_refuses_other_artifacts(tiny_model_dir, qa_file, factors_file, tmp_path):
    update = tmp_path / "u.safetensors"
    estimate.estimate(
        estimate.EstimateConfig(
            model=str(tiny_model_dir), data=str(qa_file), out=str(update), samples=8, report_ranks="2,4"
        )
    )
    with pytest.raises(SystemExit) as done:
        main(["inspect", str(update), "--plot", str(tmp_path / "spectrum.png")])
    assert done.value.code == 0 and (tmp_path / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(BadInputError, match="--plot draws an update's spectra"):
        inspect.plot_update(factors_file, tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()
