"""`lorasb decompose --init NAME`: how B [m, r], R [r, r], A [r, n] are made from one matrix per target module.

Each init is declared here (`register` at the end) and implemented by a `factor` function in its own module.
`source` says what the matrix is: ΔW_avg from an update (`update`) or the pretrained weight W0 (`model`). Every
init sees one module's matrix at a time, so decompose streams module by module.

Declaration and implementation are apart, so that `lorasb decompose --help` and its usage errors import no torch:
this module imports none and holds what the CLI shows and parses (name, summary, options); the module of an
init's `factor` is imported when the init runs. A new init is its module and one `register` line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..options import NON_NEGATIVE, Declared, option, plugin_fields, plugin_options, takes
from ..registry import Registry, import_implementation

if TYPE_CHECKING:
    import torch

    # B [m, r], R [r, r], A [r, n], and the top-r singular values S [r] of the matrix that was factored.
    Factorization = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class OwnOptions(Declared):
    """An init's own options (`Init.options`), declared as lorasb_cli/options.py fields: `lorasb decompose`'s
    flags are generated from them and a flag the chosen init does not take is refused. This base has none."""


@dataclass(frozen=True, kw_only=True)
class NoisyOptions(OwnOptions):
    noise_std: float = option(
        type=float, range=NON_NEGATIVE, required=True, help="σ of the noise, in units of η (e.g. 1)."
    )


@dataclass(frozen=True)
class InitOptions:
    """What an init may use besides the matrix: the SVD settings, η of the update, and its own options."""

    niter: int = 4
    exact: bool = False
    eta: float | None = None
    own: OwnOptions = OwnOptions()


@dataclass(frozen=True)
class Init:
    """An init as declared: `implementation` names its `factor(matrix, rank, options) -> Factorization` as
    "module:function" of this package, imported on first use (`factor`)."""

    name: str
    source: str  # "update" (ΔW_avg) or "model" (W0)
    summary: str
    implementation: str
    scale: float = 1.0  # s of W = W0 + s·B·R·A
    options: type[OwnOptions] = OwnOptions

    @property
    def factor(self) -> Callable[[torch.Tensor, int, InitOptions], Factorization]:
        return import_implementation(__name__, self.implementation)

    def resolve_options(self, given: Mapping[str, object]) -> OwnOptions:
        """This init's own options from those given on the command line (`DecomposeConfig.init_options`)."""
        return plugin_options(self.options, given, kind="--init", name=self.name, takers=_takers)


INITS: Registry[Init] = Registry("--init")


def register(init: Init) -> Init:
    return INITS.register(init.name, init)


def get_init(name: str) -> Init:
    return INITS.lookup(name)


def option_fields():
    """Every init's own options, each once: flags of `lorasb decompose`."""
    return plugin_fields(i.options for i in INITS.values())


def _takers(option_name: str) -> list[str]:
    return [i.name for i in INITS.values() if takes(i.options, option_name)]


def svd_factors(
    matrix: torch.Tensor, rank: int, options: InitOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r [m, r], S_r [r], V_rᵀ [r, n] of `matrix` (randomized unless `options.exact`)."""
    from ..linalg import truncated_svd

    return truncated_svd(matrix, rank, niter=options.niter, exact=options.exact)


register(Init("kaiming", "update", "SVD of a Kaiming-uniform matrix, scaled to ‖ΔW_avg‖", "kaiming:factor"))
register(Init("lora-xs", "model", "SVD of the pretrained weight W0 (LoRA-XS)", "lora_xs:factor"))
register(Init("lorasb", "update", "SVD of the estimated update ΔW_avg", "lorasb:factor"))
register(Init("noisy", "update", "SVD of ΔW_avg plus Gaussian noise of σ·η", "noisy:factor", options=NoisyOptions))
register(Init("non-orthonormal", "update", "B = U·S, R = I, A = Vᵀ of ΔW_avg", "non_orthonormal:factor"))
