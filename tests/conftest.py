"""Tiny models and data built in-process; nothing is downloaded (docs/design.md §7)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from helpers import QA_ROWS, make_llama, make_mistral, save_model, write_jsonl


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    model, tokenizer = make_llama()
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", QA_ROWS)


@pytest.fixture(scope="session")
def factors_file(tiny_model_dir, qa_file, tmp_path_factory) -> Path:
    """Rank-4 LoRA-SB factors of the tiny model, estimated on 8 samples of QA_ROWS."""
    from lorasb_cli import estimate
    from lorasb_cli.decompose import DecomposeConfig, decompose

    folder = tmp_path_factory.mktemp("factors")
    update = folder / "u.safetensors"
    estimate.estimate(estimate.EstimateConfig(model=str(tiny_model_dir), data=str(qa_file), out=str(update), samples=8))
    decompose(DecomposeConfig.from_options(update=str(update), rank=4, out=str(folder / "f.safetensors")))
    return folder / "f.safetensors"


@pytest.fixture(scope="session")
def mistral_model_dir(tmp_path_factory) -> Path:
    model, tokenizer = make_mistral()
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny-mistral"))
