"""`lorasb train --method NAME`: what is trained, and how the result becomes an adapter.

Every method writes the same adapter (docs/design.md §2): `<module>.lora_{B,R,A}` relative to the *original* W0,
so `merge` (hf and peft) and `evaluate` need not know the method. A method that changes W0 at initialization
(PiSSA, LoRA-GA, MiLoRA, IniLoRA: W_res = W0 − s·B0·A0) is exported as PEFT documents for PiSSA/LoRA-GA
conversion, a rank-2r LoRA: B' = [B, B0], R = diag(s·I, −s·I), A' = [A; A0]. A method whose layer computes
something else from them (DoRA: a magnitude per output row) declares its `variant` (adapter.LayerVariant): the
per-module tensors it stores beside B, R, A, its forward, merge and PEFT export, so that `adapter`, `merge` and
`inspect` never name a method. Full fine-tuning stores the trained tensors under their state_dict names.

Declaration and implementation are apart, so that `lorasb train --help` and its usage errors import no torch or
PEFT: this module imports neither and declares every method (name, summary, options: what the CLI shows and
parses) at its end, naming the function that implements it; that function's module (one per method or family,
beside this one) is imported when the method is prepared. A new method is its module and one `register` line here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..options import (
    AT_LEAST_1,
    POSITIVE,
    Declared,
    Range,
    option,
    plugin_fields,
    plugin_options,
    positive_or_auto,
    rank,
    takes,
    targets,
)
from ..registry import Registry, import_implementation

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .. import adapter, artifacts


@dataclass(frozen=True, kw_only=True)
class MethodOptions(Declared):
    """A method's own options (`Method.options`), declared as lorasb_cli/options.py fields: `lorasb train`'s
    flags are generated from them and a flag the chosen method does not take is refused. This base has none."""

    @property
    def holds_out_probe(self) -> bool:
        """Whether the method chooses something by the loss on held-out training samples, which train then keeps
        out of the training set."""
        return False


@dataclass(frozen=True, kw_only=True)
class LowRankOptions(MethodOptions):
    """Low-rank matrices of `rank` on the `targets` modules, scaled α/r (LoRA and its variants)."""

    rank: int | None = rank(required=True, help="Rank of the low-rank matrices.")
    targets: str = targets()
    alpha: float | None = option(
        type=float, range=POSITIVE, help="LoRA α [default: the method's paper: 2r, or r for PiSSA/MiLoRA]."
    )
    # LoRA-SB takes none: its paper trains R without dropout, and B, R, A are not PEFT's layers.
    lora_dropout: float = option(
        default=0.0,
        range=Range(0, 1, open_high=True),
        help="Dropout on the LoRA branch's input while training (PEFT's lora_dropout); eval is unaffected.",
    )

    def alpha_or(self, default: float) -> float:
        return self.alpha if self.alpha is not None else default


@dataclass(frozen=True, kw_only=True)
class LoraSBOptions(MethodOptions):
    init_scale: float | str = option(
        default=1.0,
        type=str,
        help="Multiply R_init by this factor (> 0), or auto: the factor with the lowest held-out loss.",
    )

    def __post_init__(self):
        super().__post_init__()
        # 0 would train from R = 0, a negative factor uphill
        object.__setattr__(self, "init_scale", positive_or_auto(self.init_scale, "--init-scale"))

    @property
    def holds_out_probe(self) -> bool:
        return self.init_scale == "auto"


@dataclass(frozen=True, kw_only=True)
class LoraGAOptions(LowRankOptions):
    init_samples: int = option(default=32, range=AT_LEAST_1, help="Samples of LoRA-GA's gradient estimate.")


@dataclass(frozen=True, kw_only=True)
class IniLoraOptions(LowRankOptions):
    init_iters: int = option(default=1000, range=AT_LEAST_1, help="Iterations of IniLoRA's fit of B·A to W0.")


@dataclass
class Setup:
    """What a method gets: the loaded base `model` (a classifier's head already in place), its target
    `modules`, the `rank`, the method's `options`, the checked factors (`lorasb` only), a `probe_loss(model)` on
    held-out samples, `batches(n)`: training batches covering n samples, and whether the run `resumes` (its
    checkpoint's tensors replace whatever the method initializes)."""

    model: nn.Module
    modules: list[str]
    rank: int | None
    seed: int
    options: MethodOptions = field(default_factory=MethodOptions)
    factors: artifacts.FactorsFile | None = None  # as artifacts.load_factors returns
    probe_loss: Callable[[nn.Module], float] | None = None
    batches: Callable[[int], Iterable[dict]] | None = None
    resumes: bool = False


@dataclass
class Prepared:
    """The module the Trainer trains, how to export it as adapter tensors, and the settings to record."""

    model: nn.Module
    export: Callable[[], dict[str, torch.Tensor]]
    config: dict = field(default_factory=dict)
    # Set when the parameters were upcast to float32 master weights (full fine-tuning of a bf16/fp16 base): train
    # under autocast in this dtype, as the Trainer's bf16/fp16 does.
    mixed_precision: torch.dtype | None = None
    # A method with its own optimizer (LoRA-Pro): builds it from the TrainingArguments (lr, betas, eps, weight
    # decay); the Trainer still makes the --scheduler around it. None: the Trainer's AdamW.
    optimizer: Callable[[object], torch.optim.Optimizer] | None = None

    def autocast(self, device: torch.device) -> torch.autocast:
        """The precision the model trains its forward in: autocast to the base dtype for upcast master weights, a
        no-op otherwise. Losses measured outside training (step 0, the final eval) run under it too."""
        import torch

        mixed = self.mixed_precision
        return torch.autocast(device.type, dtype=mixed or torch.bfloat16, enabled=mixed is not None)


@dataclass(frozen=True)
class Method:
    """A method as declared: `implementation` names its `prepare(setup) -> Prepared` as "module:function" of this
    package, imported on first use (`prepare`); `variant`, where its layer is not W0 + s·B·R·A, names its
    adapter.LayerVariant subclass as "module:Class" (`layer_variant`)."""

    name: str
    summary: str
    implementation: str
    options: type[MethodOptions] = MethodOptions
    variant: str | None = None
    needs_factors: bool = False  # trains between the B, A of a factors file (train --factors)
    worse_init_hint: str = ""  # what to change when the initialized model is worse than the base
    # Trains on a base whose linear layers are quantized (train --quantize): it neither reads nor changes W0 itself.
    quantized_base: bool = False

    @property
    def prepare(self) -> Callable[[Setup], Prepared]:
        return import_implementation(__name__, self.implementation)

    @property
    def layer_variant(self) -> adapter.LayerVariant:
        """How an adapter of this method computes its layers (evaluate, merge): its declared variant, else
        W0 + s·B·R·A."""
        from .. import adapter

        return import_implementation(__name__, self.variant)() if self.variant else adapter.PLAIN

    @property
    def uses_rank(self) -> bool:
        """False for the methods that train no low-rank matrices (full fine-tuning, the head alone)."""
        return self.needs_factors or takes(self.options, "rank")

    def resolve_options(self, given: Mapping[str, object]) -> MethodOptions:
        """This method's options from those given on the command line (`TrainConfig.method_options`)."""
        return plugin_options(self.options, given, kind="--method", name=self.name, takers=_takers)


METHODS: Registry[Method] = Registry("--method")


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    return METHODS.lookup(name)


def layer_variant(recorded: str | None) -> adapter.LayerVariant:
    """The layer variant of an adapter whose provenance records the method `recorded` (None: a factors file used
    as an untrained adapter, or an unknown method: W0 + s·B·R·A)."""
    from .. import adapter

    return METHODS[recorded].layer_variant if recorded in METHODS else adapter.PLAIN


def factors_methods() -> list[Method]:
    """The methods that train between the B, A of a factors file (`train --factors`): LoRA-SB's."""
    return [m for m in METHODS.values() if m.needs_factors]


def option_fields():
    """Every method's options, each once: the flags of `lorasb train`."""
    return plugin_fields(m.options for m in METHODS.values())


def _takers(option_name: str) -> list[str]:
    return [m.name for m in METHODS.values() if takes(m.options, option_name)]


def train_head(model: nn.Module) -> dict[str, nn.Parameter]:
    """A sequence classifier's head, made trainable float32 master weights (`train_in_float32`)."""
    from .. import adapter, models

    return adapter.train_in_float32(model, models.head_parameters(model))


def tensors_of(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().contiguous() for name, p in params.items()}


register(Method("full", "full fine-tuning of every parameter", "full:prepare_full"))
register(Method("head", "the classifier head only (sequence classification)", "full:prepare_head", quantized_base=True))
register(Method("lora", "LoRA (PEFT), α = 2r", "peft_lora:prepare_lora", options=LowRankOptions, quantized_base=True))
register(
    Method(
        "rslora", "rank-stabilized LoRA (PEFT), s = α/√r, α = 2r", "peft_lora:prepare_rslora", options=LowRankOptions
    )
)
register(
    Method("dora", "DoRA (PEFT), α = 2r", "peft_lora:prepare_dora", options=LowRankOptions, variant="dora:DoraVariant")
)
register(
    Method(
        "pissa",
        "PiSSA (PEFT): principal singular components of W0, α = r",
        "peft_lora:prepare_pissa",
        options=LowRankOptions,
    )
)
register(
    Method(
        "loraga",
        "LoRA-GA (PEFT): gradient-aligned init over --init-samples, α = 2r",
        "peft_lora:prepare_loraga",
        options=LoraGAOptions,
    )
)
register(
    Method(
        "inilora",
        "IniLoRA: A, B fitted to W0 from N(μ, σ²) of W0, residual frozen, α = 2r",
        "inilora:prepare_inilora",
        options=IniLoraOptions,
    )
)
register(
    Method(
        "inilora-alpha",
        "IniLoRA: A, B fitted to W0 from N(0, 0.5²), residual frozen, α = 2r",
        "inilora:prepare_inilora_alpha",
        options=IniLoraOptions,
    )
)
register(
    Method(
        "inilora-beta",
        "IniLoRA: A, B fitted to W0 from Kaiming, residual frozen, α = 2r",
        "inilora:prepare_inilora_beta",
        options=IniLoraOptions,
    )
)
register(
    Method(
        "lora-pro",
        "LoRA-Pro: LoRA whose optimizer follows the full gradient's AdamW, α = 2r",
        "lora_pro:prepare",
        options=LowRankOptions,
    )
)
register(
    Method(
        "lorasb",
        "R only, between frozen B and A from --factors (LoRA-SB)",
        "lorasb:prepare",
        options=LoraSBOptions,
        needs_factors=True,
        quantized_base=True,
        worse_init_hint="η is too large for this model; "
        "re-run estimate with a smaller --eta or pass --init-scale below 1",
    )
)
register(
    Method(
        "milora",
        "MiLoRA: LoRA on the minor singular components of W0, α = r",
        "milora:prepare",
        options=LowRankOptions,
    )
)
