"""What `evaluate` and `generate` share to answer prompts with a model: the template and system prompt a model is
prompted with (`resolve_prompting`), the model with its adapter applied (`load_applied`), and generation with
stop strings, greedy or sampled (`generate`, `cut`).

A prompt is tokenized as its template tokenizes it in training, so generation starts from exactly the training
ids (lorasb_cli/templates.py).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from . import adapter, artifacts, metadata, methods, models, templates
from .errors import BadInputError

log = logging.getLogger("lorasb")


@dataclass(frozen=True)
class Prompting:
    """How prompts are rendered: the template, the chat system prompt, and where they came from."""

    template: str
    system_prompt: str | None
    source: str  # e.g. "recorded in the adapter run/", "picked from the fields answer, question"

    def for_tokenizer(self, tokenizer) -> Prompting:
        """A prompt nothing said how to render goes through the tokenizer's chat template where it has one: an
        instruct model given bare text often answers with its end-of-turn token at once (an empty completion)."""
        if self.source != NOTHING_RECORDED or not getattr(tokenizer, "chat_template", None):
            return self
        return Prompting("chat", None, "nothing recorded: the tokenizer's chat template")

    def describe(self) -> str:
        """The log line evaluate and generate print: `template: alpaca (recorded in ...)`."""
        system = f", system prompt {templates.shorten(self.system_prompt)!r}" if self.system_prompt else ""
        return f"template: {self.template} ({self.source}){system}"


NOTHING_RECORDED = "nothing recorded: the prompt as given"


def resolve_prompting(options, columns: Sequence[str] | None, saved: adapter.Adapter | None) -> Prompting:
    """The template and system prompt that the adapter `saved`, the merged model or `--template-of` recorded,
    unless `--template` names another template (an error without `--force-template`); `auto` otherwise picks from
    the data's `columns`, or is `plain` (the prompt as given) where there are none (`columns` None).
    `--system-prompt` replaces a recorded system prompt. `options`: an `AppliedOptions` (lorasb_cli/configs.py)."""
    if options.template_of and options.adapter:
        raise BadInputError(
            "--template-of prompts a model as another adapter is prompted; --adapter brings its own template",
            hint="drop --template-of",
        )
    if options.template_of:
        recorded, where = recorded_prompting(options.template_of), f"recorded in {options.template_of} (--template-of)"
    elif saved is not None:
        recorded, where = saved.meta.data or metadata.DataProvenance(), f"recorded in the adapter {options.adapter}"
    else:
        model_dir = Path(models.resolve_model(options.model).path)  # a hub id records nothing lorasb wrote
        recorded, where = (
            recorded_prompting(str(model_dir)) if model_dir.is_dir() else metadata.DataProvenance(),
            "recorded in the merged model",
        )
    if options.template == "auto" and recorded.template is not None:
        template, source = recorded.template, where
    else:
        if options.template == "auto" and columns is None:
            template, source = "plain", NOTHING_RECORDED
        else:
            template = templates.resolve(options.template, columns or ())
            source = (
                "--template" if options.template != "auto" else f"picked from the fields {', '.join(sorted(columns))}"
            )
        templates.check_same(recorded.template, template, "training", force=options.force_template)
    if options.system_prompt is None:
        system_prompt = recorded.system_prompt if template == "chat" else None
    else:
        system_prompt = templates.system_prompt(options.system_prompt, template, ())
        if recorded.system_prompt not in (None, system_prompt):
            log.warning("--system-prompt replaces the system prompt training used, %r", recorded.system_prompt)
    return Prompting(template, system_prompt, source)


def recorded_prompting(path: str) -> metadata.DataProvenance:
    """The data provenance (`template`, `system_prompt`) that an adapter directory, a factors file or a merged
    model records; empty for a model lorasb did not write."""
    folder = Path(path)
    file = folder / adapter.ADAPTER_FILE if folder.is_dir() else folder
    if file.is_file():
        return artifacts.Artifact(file, kinds=("adapter", "factors")).meta.data or metadata.DataProvenance()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise BadInputError(
            "not an adapter, factors file or model directory", path=path, hint="pass a lorasb train -o or merge -o"
        )
    return artifacts.merged_from(folder).prompting()


def load_applied(options, saved: adapter.Adapter | None, head: str = "causal-lm") -> tuple[nn.Module, object]:
    """The model `options.model` (and its tokenizer) in eval mode, with the adapter `saved` injected unmerged once
    it is checked to fit the model and to have been made on its weights (`--force-base` applies it to another)."""
    ref = models.resolve_model(options.model)
    if saved is not None:
        shapes = models.linear_shapes_from_config(ref, trust_remote_code=options.trust_remote_code, head=head)
        saved.check_fits(shapes, f"model '{ref.id}'", hint="pass the model the adapter was trained on")
        what = "the adapter" if isinstance(saved.meta, metadata.AdapterMeta) else "the factors"
        models.check_base(saved.meta.base_model, ref, what=what, path=str(saved.path), force=options.force_base)
    device, dtype = models.placement(options.device, options.dtype)
    model, tokenizer = models.load_model(
        ref,
        device=device,
        dtype=dtype,
        quantize=options.quantize,
        trust_remote_code=options.trust_remote_code,
        allow_pickle=options.allow_pickle,
        head=head,
        labels=saved.meta.labels if saved is not None else None,
    )
    if saved is None:
        return model, tokenizer
    variant = methods.layer_variant(saved.meta.method)
    adapter.inject(model, saved.factors, scale=saved.scale, variant=variant, tensors=saved.module_tensors)
    adapter.load_extra(model, saved.extra, trainable=False)
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: softmax(logits / `temperature`) cut to the smallest set of tokens whose probability
    reaches `top_p` (no top-k), the generator seeded with `seed` before each batch."""

    temperature: float
    top_p: float = 1.0
    seed: int = 0


def cut(output: str, stop: Sequence[str]) -> str:
    """`output` up to the first of the stop strings (all of it where none occurs)."""
    for text in stop:
        output = output.split(text, 1)[0]
    return output


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    add_special_tokens: bool,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 1,
    sampling: Sampling | None = None,
    streamer: StopStreamer | None = None,
) -> list[str]:
    """Continuations of the rendered `prompts` (greedy, or `sampling`), at most `max_new_tokens` tokens each. A
    continuation also ends once it ends with a string of `stop`, which it keeps: `cut` removes it. Prompts are
    batched `batch_size` at a time with left padding; a `streamer` (batch size 1) sees each token as it comes."""
    from transformers import GenerationConfig

    sampled = {} if sampling is None else {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling is not None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
        stop_strings=list(stop) or None,
        **sampled,
    )
    # Stop strings are matched on the tokens' text, so generate needs the tokenizer, and only then.
    extra = ({"tokenizer": tokenizer} if stop else {}) | ({"streamer": streamer} if streamer is not None else {})
    if streamer is not None and batch_size != 1:
        raise ValueError("a streamer follows one prompt at a time: batch_size must be 1")
    tokenizer.padding_side = "left"  # generation appends on the right: prompts must end together
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    device = next(model.parameters()).device
    outputs: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        encoded = tokenizer(
            [prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        ).to(device)
        if sampling is not None:
            torch.manual_seed(sampling.seed)  # a prompt's sample does not depend on the prompts before it
        generated = model.generate(**encoded, generation_config=config, **extra)
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text
    return [outputs[i] for i in range(len(prompts))]


class StopStreamer:
    """Writes one continuation to `out` as `generate` produces it, exactly the text `cut(output, stop)` returns:
    text that may still become a stop string, or an incomplete UTF-8 character, is held back until it cannot.
    transformers calls `put` with the prompt's ids first, then each new token's, and `end` once done."""

    def __init__(self, tokenizer, stop: Sequence[str], out: TextIO = sys.stdout):
        self.tokenizer, self.stop, self.out = tokenizer, tuple(stop), out
        self.ids: list[int] | None = None  # None until the prompt's ids went by
        self.written = 0  # characters of the continuation written so far
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if self.ids is None:
            self.ids = []
            return
        self.ids += value.reshape(-1).tolist()
        self._write(final=False)

    def end(self) -> None:
        self._write(final=True)
        self.out.flush()

    def _write(self, *, final: bool) -> None:
        if self.stopped or self.ids is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        shown = cut(text, self.stop)
        self.stopped = len(shown) < len(text)
        if not (final or self.stopped):
            shown = shown[: len(shown) - self._held(shown)]
        if len(shown) > self.written:
            self.out.write(shown[self.written :])
            self.out.flush()
            self.written = len(shown)

    def _held(self, text: str) -> int:
        """How many trailing characters to hold back: a partial character, or the longest ending that begins a
        stop string."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        return max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
