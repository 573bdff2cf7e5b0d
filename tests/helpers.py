"""Builders the tests share: tiny models, tokenizers and data, made in-process (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "what is 12 plus 30 ? 12 plus 30 is 42 . the answer is 42",
    "below is an instruction that describes a task . write a response that appropriately completes the request",
    "### instruction : ### response : #### 7 seven eight nine ten",
    "natalia sold clips to 48 of her friends in april , and then she sold half as many clips in may",
]

QA_ROWS = [
    {"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}. #### {a + b}"}
    for a, b in [(1, 2), (3, 4), (10, 20), (7, 8), (12, 30), (5, 5), (9, 1), (2, 40), (6, 7), (11, 3), (8, 8), (4, 9)]
]


CLASS_ROWS = [
    {"text": f"{w} {w} the {v} said", "label": label}
    for label, words in {
        "earn": ["profit", "dividend"],
        "crude": ["oil", "barrel"],
        "trade": ["tariff", "export"],
    }.items()
    for w in words
    for v in ("company", "market", "bank")
]


def make_tokenizer():
    """A byte-level BPE tokenizer trained on CORPUS, with BOS prepended like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _tiny_causal_lm(config_class, model_class, tokenizer, seed, hidden, layers, dtype, pad_token_id):
    """A random causal LM of `hidden` width and `layers` layers (4 heads, 2 KV heads) over `tokenizer`'s vocabulary."""
    config = config_class(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    return model_class(config).to(dtype).eval()


def make_llama(seed: int = 0, hidden: int = 64, layers: int = 2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    model = _tiny_causal_lm(
        LlamaConfig, LlamaForCausalLM, tokenizer, seed, hidden, layers, dtype, tokenizer.pad_token_id
    )
    return model, tokenizer


def save_model(model, tokenizer, path: Path, **kwargs) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_bert_dir(path: Path, seed: int = 0, positions: int = 64) -> Path:
    """A tiny BertModel of `positions` positions saved the way sentence-transformers ships encoders: no head, no
    `bert.` prefix."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = sorted({w for row in CLASS_ROWS for w in row["text"].split()})
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    # from_pretrained reads vocab.txt; transformers 5 ignores `vocab_file=` and would leave a 5-token vocabulary.
    tokenizer = BertTokenizer.from_pretrained(path)
    assert len(tokenizer) == len(words) + 5
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=positions,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_mistral(seed: int = 0, hidden: int = 64, layers: int = 2, dtype=torch.float32):
    """A tiny random MistralForCausalLM with Mistral-7B-v0.1's real tokenizer and vocabulary (32000 tokens).

    The tokenizer is converted once from mistral-common's SentencePiece file into the lorasb cache (bundled.py);
    skips when mistral-common is not installed.
    """
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from lorasb_cli import bundled

    spec = bundled.MISTRAL_TOKENIZER
    if bundled.source_path(spec) is None:
        pytest.skip(f"Mistral fixture: {spec.package} is not installed ({spec.pip_line}; make install does it)")
    tokenizer = AutoTokenizer.from_pretrained(bundled.mistral_tokenizer_dir())
    # As Mistral-7B-v0.1: no pad token.
    model = _tiny_causal_lm(
        MistralConfig, MistralForCausalLM, tokenizer, seed, hidden, layers, dtype, pad_token_id=None
    )
    return model, tokenizer


def classifier_factors(folder: Path, model_dir: Path, data: Path) -> Path:
    """`folder/u.safetensors` (estimate on 12 samples of classification `data`, seed 3) and its rank-4
    `folder/f.safetensors`, which is returned."""
    from lorasb_cli import estimate
    from lorasb_cli.decompose import DecomposeConfig, decompose

    config = estimate.EstimateConfig(
        model=str(model_dir),
        data=str(data),
        out=str(folder / "u.safetensors"),
        samples=12,
        format="classification",
        seed=3,
    )
    estimate.estimate(config)
    decompose(
        DecomposeConfig.from_options(update=str(folder / "u.safetensors"), rank=4, out=str(folder / "f.safetensors"))
    )
    return folder / "f.safetensors"


def train_config(model, data, out, **overrides):
    """A small `lorasb train` run's config: 8 steps of batch 4 at lr 5e-2, a checkpoint every 2 steps, the loss
    logged at every step, seed 0; paths may be Paths."""
    from lorasb_cli import train

    settings = {"model": model, "data": data, "out": out, "max_steps": 8, "batch_size": 4, "lr": 5e-2}
    settings |= {"save_steps": 2, "logging_steps": 1, "seed": 0} | overrides
    return train.TrainConfig.from_options(**{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()})


def random_r_adapter(factors_file: Path, run_dir: Path) -> Path:
    """An adapter directory of `factors_file`'s B and A with a random non-symmetric R (seed 0) large enough to change
    the model's outputs, as a trained one would."""
    from lorasb_cli import adapter, artifacts

    loaded = artifacts.load_factors(str(factors_file))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (lora_B, _, lora_A) in loaded.factors.items():
        rank = lora_B.shape[1]
        tensors |= {
            f"{module}.lora_B": lora_B,
            f"{module}.lora_R": torch.randn(rank, rank, generator=generator) * 2,
            f"{module}.lora_A": lora_A,
        }
    config = {
        "base_model": loaded.fields["base_model"],
        "targets": "all-linear",
        "rank": rank,
        "scale": 1.0,
        "method": "lorasb",
    }
    return adapter.save_adapter(run_dir, tensors, artifact_meta("adapter", **config))


def artifact_meta(kind: str, **fields):
    """The typed metadata of an artifact of `kind` (lorasb_cli/metadata.py) from its fields as a file records them,
    nested objects as dicts."""
    from lorasb_cli import metadata

    return metadata.KIND_CLASSES[kind].from_json(fields)
