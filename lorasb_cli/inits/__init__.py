"""`lorasb decompose --init NAME`: how B [m, r], R [r, r], A [r, n] are made from one matrix per target module.

Each init lives in its own module and registers an `Init`. `source` says what the matrix is: ΔW_avg from an
update (`update`) or the pretrained weight W0 (`model`). Every init sees one module's matrix at a time, so
decompose streams module by module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..options import plugin_fields, plugin_options, takes
from ..registry import Registry, import_plugins

# B [m, r], R [r, r], A [r, n], and the top-r singular values S [r] of the matrix that was factored.
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class OwnOptions:
    """An init's own options (`Init.options`), declared as lorasb_cli/options.py fields: `lorasb decompose`'s
    flags are generated from them and a flag the chosen init does not take is refused. This base has none."""


@dataclass(frozen=True)
class InitOptions:
    """What an init may use besides the matrix: the SVD settings, η of the update, and its own options."""

    niter: int = 4
    exact: bool = False
    eta: float | None = None
    own: OwnOptions = OwnOptions()


@dataclass(frozen=True)
class Init:
    name: str
    source: str  # "update" (ΔW_avg) or "model" (W0)
    factor: Callable[[torch.Tensor, int, InitOptions], Factors]
    scale: float = 1.0  # s of W = W0 + s·B·R·A
    summary: str = ""
    options: type[OwnOptions] = OwnOptions

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


import_plugins(__name__, __path__)
