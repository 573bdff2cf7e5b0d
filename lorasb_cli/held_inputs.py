"""What a backward keeps of a target's input: estimate's hooks hold each linear input until its output's gradient
arrives, and the memory plan counts what they hold. An input that autograd's saved tensors can rebuild bit for bit
(SwiGLU's act(gate)·up, RMSNorm's weight·(x·rsqrt)) is rebuilt instead of held.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_SAVED = ("_saved_self", "_saved_other")
_HALF = (torch.bfloat16, torch.float16)
_Part = tuple[Callable[[], torch.Tensor], torch.dtype, torch.Size]


def _rebuild(fn, out_dtype: torch.dtype | None, depth: int = 2) -> _Part | None:
    """(call, dtype, shape) that recomputes the output of the product node `fn` (MulBackward0) from tensors autograd
    keeps for its backward anyway, or None: SwiGLU's act(gate)·up before down_proj; RMSNorm's weight·(x·rsqrt)
    before q/k/v and gate/up, whose inner product is saved and, in bf16/fp16 models, cast (ToCopyBackward0).

    The same multiplications of the same tensors: bit for bit the forward's result. A cast's target dtype is not in
    the graph; it is taken only where it is the one possible: `out_dtype` (the product's, when known) is bf16 or
    fp16 and the other factor has it — a cast to any other float would have promoted the product.
    """
    if fn is None or type(fn).__name__ != "MulBackward0":
        return None
    saved = [getattr(fn, attr, None) for attr in _SAVED]
    parts: list[_Part] = []
    for i, (source, _) in enumerate(fn.next_functions):
        if isinstance(saved[i], torch.Tensor):
            parts.append(((lambda attr=_SAVED[i]: getattr(fn, attr)), saved[i].dtype, saved[i].shape))
            continue
        if depth == 0 or source is None:
            return None
        other = saved[1 - i]
        if type(source).__name__ == "ToCopyBackward0":
            if out_dtype not in _HALF or not isinstance(other, torch.Tensor) or other.dtype != out_dtype:
                return None
            inner = _rebuild(source.next_functions[0][0], None, depth - 1)
            if inner is None:
                return None
            parts.append(((lambda call=inner[0]: call().to(out_dtype)), out_dtype, inner[2]))
        else:
            inner = _rebuild(source, None, depth - 1)
            if inner is None:
                return None
            parts.append(inner)
    (a, a_dtype, a_shape), (b, b_dtype, b_shape) = parts
    if not a_shape or not b_shape:  # a 0-dim factor promotes differently; not a pattern seen here
        return None
    dtype, shape = torch.promote_types(a_dtype, b_dtype), torch.broadcast_shapes(a_shape, b_shape)
    return (lambda: torch.mul(a(), b())), dtype, shape


def recomputable(x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """A call that rebuilds x bit for bit from what autograd saves anyway (see `_rebuild`), or None."""
    part = _rebuild(x.grad_fn, x.dtype)
    if part is None or part[1] != x.dtype or part[2] != x.shape:
        return None
    return part[0]


def held_input(x: torch.Tensor) -> tuple[Callable[[], torch.Tensor], bool]:
    """What estimate keeps of a target's input x [.., n] until its output's gradient arrives: (a call that gives
    x, whether that call rebuilds x).

    A recomputable x costs nothing until then (what it is rebuilt from is alive anyway); any other x is held as
    is — q/k/v (and gate/up) read one tensor, so they hold one storage, and o_proj's input is the attention
    output the fused kernels already keep.
    """
    recipe = recomputable(x)
    if recipe is not None:

        def rebuilt() -> torch.Tensor:
            with torch.no_grad():
                return recipe()

        return rebuilt, True
    held = x.detach()
    return (lambda: held), False
