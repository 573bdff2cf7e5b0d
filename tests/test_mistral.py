"""Mistral: the real Mistral-7B-v0.1 tokenizer (bundled in mistral-common), the `mistral` alias's targets from
its real config on the meta device, and the whole CLI chain on a tiny random Mistral (docs/design.md §7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QA_ROWS, artifact_meta, write_jsonl

from lorasb_cli import adapter, bundled, cli, evaluate, files, merge, models
from lorasb_cli.errors import BadInputError

# sha256 of mistralai/Mistral-7B-v0.1's tokenizer.model on the hub (493,443 bytes); mistral-common ships it as-is.
MISTRAL_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

# Mistral-7B-v0.1's config.json, the values that fix the shapes of its linear layers.
MISTRAL_7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
PROJECTIONS = ATTENTION | {"gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    if bundled.source_path(bundled.MISTRAL_TOKENIZER) is None:
        pytest.skip(f"mistral-common is not installed ({bundled.MISTRAL_TOKENIZER.pip_line})")
    return AutoTokenizer.from_pretrained(bundled.mistral_tokenizer_dir())


def tokens(tok, text: str, **kwargs) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, **kwargs)["input_ids"])


# --- 1. the tokenizer is Mistral-7B-v0.1's --------------------------------------------------------------------


def test_the_bundled_tokenizer_is_mistral_7b_v01s(tokenizer):
    source = bundled.source_path(bundled.MISTRAL_TOKENIZER)
    assert files.file_sha256(source) == MISTRAL_TOKENIZER_SHA256
    assert len(tokenizer) == 32000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token is None  # Mistral has none; models.load_model sets pad = EOS

    # SentencePiece: a word after a newline has no "▁"; at the start of a text it does. BOS first, no EOS.
    joint = tokens(tokenizer, "### Response:\n" + "The answer is: 42")
    assert joint[0] == "<s>" and joint[-1] != "</s>"
    start = joint.index("<0x0A>")
    assert joint[start : start + 3] == ["<0x0A>", "The", "▁answer"]
    assert "▁The" not in joint
    alone = tokens(tokenizer, "The answer is: 42", add_special_tokens=False)
    assert alone[0] == "▁The"
    assert tokenizer("The answer is: 42")["input_ids"] == [1, 415, 4372, 349, 28747, 28705, 28781, 28750]


def test_fast_tokenizer_encodes_as_sentencepiece_itself(tokenizer):
    """Token for token on text with single spaces. (Runs of spaces differ, "a  b" -> ▁a ▁▁ b here, ▁a ▁ ▁b in
    SentencePiece, as with every converted Llama-family fast tokenizer: it does not split on whitespace first.)"""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(bundled.source_path(bundled.MISTRAL_TOKENIZER)))
    texts = [
        "The answer is: 42",
        "### Instruction:\nNatalia sold clips to 48 of her friends in April.\n\n### Response:\n",
        "She sold 48/2 = 24 clips in May.\n#### 72",
        "tab\tand trailing ",
        "x\n y",
        "Ünïcödé, emoji 🙂, 中文, and $\\frac{3}{4}$ #### 1,165",
    ]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == sp.decode(sp.encode(text))


def test_conversion_is_cached_atomically(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LORASB_HOME", str(tmp_path))
    directory = bundled.mistral_tokenizer_dir()
    assert directory.parent == tmp_path / "tokenizers"
    assert directory.name == f"mistral-7b-v0.1-{MISTRAL_TOKENIZER_SHA256[:16]}"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in directory.iterdir()}
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # no staging folder left behind

    def convert_again(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(bundled, "_convert_sentencepiece", convert_again)
    assert bundled.mistral_tokenizer_dir() == directory


def test_missing_packages_are_one_line_errors_naming_the_pip_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASB_HOME", str(tmp_path))
    real_source_path = bundled.source_path
    monkeypatch.setattr(bundled, "source_path", lambda spec: None)
    with pytest.raises(
        BadInputError, match=r"install it with: pip install --no-deps --target \S+ mistral-common==1\.13\.1"
    ) as e:
        bundled.mistral_tokenizer_dir()
    assert "\n" not in str(e.value)

    if real_source_path(bundled.MISTRAL_TOKENIZER) is None:
        pytest.skip("mistral-common is not installed")
    monkeypatch.setattr(bundled, "source_path", real_source_path)
    monkeypatch.setattr(bundled, "_installed", lambda module: module != "google.protobuf")
    with pytest.raises(BadInputError, match=r"needs protobuf>=4 — install with: pip install 'protobuf>=4'") as e:
        bundled.mistral_tokenizer_dir()
    assert "\n" not in str(e.value)
    assert not list(tmp_path.rglob("*"))  # nothing written


# --- 2. the `mistral` alias: targets and shapes of the real architecture, on the meta device -------------------


def test_mistral_alias_targets_and_shapes_on_meta_device(tmp_path):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import MistralConfig, MistralForCausalLM

    assert models.ALIASES["mistral"] == "mistralai/Mistral-7B-v0.1"
    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**MISTRAL_7B))

    modules = models.resolve_targets(model, "all-linear")
    assert len(modules) == 32 * 7
    assert "lm_head" not in modules and not any("embed" in m for m in modules)
    expected = {
        "q_proj": (4096, 4096),
        "k_proj": (1024, 4096),
        "v_proj": (1024, 4096),
        "o_proj": (4096, 4096),
        "gate_proj": (14336, 4096),
        "up_proj": (14336, 4096),
        "down_proj": (4096, 14336),
    }
    shapes = models.target_shapes(model, modules)
    assert shapes == {
        f"model.layers.{i}.{'self_attn' if p in ATTENTION else 'mlp'}.{p}": shape
        for i in range(32)
        for p, shape in expected.items()
    }
    attention = models.resolve_targets(model, "attention")
    assert len(attention) == 32 * 4 and {m.rsplit(".", 1)[1] for m in attention} == ATTENTION

    # The PEFT export: merge._write_peft itself, on an adapter whose factors sit under these module names
    # (1×1 placeholders: only the names reach target_modules).
    factors = {m: (torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1)) for m in modules}
    meta = artifact_meta("adapter", base_model={"id": "mistral", "fingerprint": "0" * 16})
    stub = adapter.Adapter(path=tmp_path, meta=meta, fields=meta.to_json(), factors=factors, extra={})
    merge._write_peft(stub, adapter.PLAIN, models.ModelRef(id=models.ALIASES["mistral"], path="-"), tmp_path, {}, None)
    config = json.loads((tmp_path / merge.PEFT_CONFIG_FILE).read_text())
    target_modules = config["target_modules"]
    assert {m.rsplit(".", 1)[1] for m in target_modules} == PROJECTIONS
    # ...and PEFT selects exactly those 224 linear layers of Mistral-7B with them: never lm_head.
    lora = LoraConfig(target_modules=target_modules)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [n for n in linears if check_target_module_exists(lora, n)] == modules


# --- 3. the whole CLI chain on a tiny random Mistral with the real tokenizer ------------------------------------


def run(args: list, capsys) -> str:
    """`lorasb ARGS` in-process through the real entry point; returns stdout (the path written)."""
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert excinfo.value.code == 0, f"lorasb {args[0]} failed: {err}"
    return out.strip()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _cli_chain(base_dir, tmp_path, capsys) -> tuple[str, str, str]:
    """estimate → decompose → train → merge (hf and peft) through the CLI; returns (run, merged, exported)."""
    data = write_jsonl(tmp_path / "gsm.jsonl", QA_ROWS)  # question / answer ending "#### N"
    update = run(
        [
            "estimate",
            "-m",
            base_dir,
            "-d",
            data,
            "--samples",
            8,
            "--max-length",
            64,
            "-q",
            "-o",
            tmp_path / "u.safetensors",
        ],
        capsys,
    )
    assert update == str(tmp_path / "u.safetensors")
    factors = run(["decompose", update, "--rank", 4, "-q", "-o", tmp_path / "f.safetensors"], capsys)
    run_dir = run(
        [
            "train",
            "-m",
            base_dir,
            "-f",
            factors,
            "-d",
            data,
            "--max-steps",
            3,
            "--batch-size",
            4,
            "--lr",
            "1e-2",
            "--max-length",
            64,
            "-q",
            "-o",
            tmp_path / "run",
        ],
        capsys,
    )
    assert run_dir == str(tmp_path / "run")
    merged = run(["merge", "-a", run_dir, "-q", "-o", tmp_path / "merged"], capsys)
    exported = run(["merge", "-a", run_dir, "--format", "peft", "-q", "-o", tmp_path / "peft"], capsys)
    assert (merged, exported) == (str(tmp_path / "merged"), str(tmp_path / "peft"))
    return run_dir, merged, exported


def test_cli_chain_on_tiny_mistral(mistral_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = mistral_model_dir
    data = tmp_path / "gsm.jsonl"
    run_dir, merged, exported = _cli_chain(base_dir, tmp_path, capsys)
    results = {}
    for name, model_args in {"adapter": ["-m", base_dir, "-a", run_dir], "merged": ["-m", merged]}.items():
        out = run(
            [
                "evaluate",
                *model_args,
                "--task",
                "gsm8k",
                "-d",
                data,
                "--limit",
                4,
                "--max-new-tokens",
                8,
                "--dtype",
                "float32",
                "-q",
                "-o",
                tmp_path / f"{name}.json",
            ],
            capsys,
        )
        results[name] = json.loads(Path(out).read_text())
        assert results[name]["task"] == "gsm8k" and results[name]["count"] == 4
    assert results["merged"]["metrics"] == results["adapter"]["metrics"]
    predictions = {name: read_jsonl(evaluate.predictions_path(tmp_path / f"{name}.json")) for name in results}
    assert len(predictions["adapter"]) == 4
    # Greedy decoding from equal logits: the same prompts and the same generations.
    assert [(r["input"], r["output"]) for r in predictions["merged"]] == [
        (r["input"], r["output"]) for r in predictions["adapter"]
    ]

    # Logits: the merged checkpoint and the PEFT export reproduce the adapter (W0 + s·B·R·A, unmerged).
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    texts = [f"### Instruction:\n{QA_ROWS[0]['question']}\n\n### Response:\n", QA_ROWS[1]["answer"]]
    assert AutoTokenizer.from_pretrained(merged)(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_logits = logits(base, batch)
    saved = adapter.load_adapter(run_dir)
    assert {m.rsplit(".", 1)[1] for m in saved.factors} == PROJECTIONS and len(saved.factors) == 2 * 7
    adapter.inject(base, saved.factors, scale=saved.scale, tensors=saved.module_tensors)
    adapter_logits = logits(base.eval(), batch)
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # training moved R
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(plain, batch), adapter_logits, atol=1e-5, rtol=0)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(fresh, exported).eval()
    torch.testing.assert_close(logits(peft_model, batch), adapter_logits, atol=1e-5, rtol=0)
