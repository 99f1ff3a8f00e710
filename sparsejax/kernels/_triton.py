"""What the kernels on Pallas's Triton backend share: power-of-two sizes, padding to tiles and
compiler params."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (Triton tensors have power-of-two shapes)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def compiler_params(num_warps: int, num_stages: int):
    """``compiler_params`` for ``pl.pallas_call`` on the Triton backend, across JAX spellings."""
    try:
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    except (ImportError, AttributeError):      # older spellings
        return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))


def pad_to(a, axis: int, multiple: int):
    """``a`` zero-padded along ``axis`` to a multiple of ``multiple`` (whole tiles)."""
    extra = (-a.shape[axis]) % multiple
    if not extra:
        return a
    pads = [(0, 0)] * a.ndim
    pads[axis] = (0, extra)
    return jnp.pad(a, pads)


def loop(n: int, body, init, unroll: bool):
    """``fori_loop(0, n, body, init)`` or, for short static loops, Python unrolling: unrolled,
    the independent weight loads of all steps can be in flight at once."""
    if not unroll:
        return jax.lax.fori_loop(0, n, body, init)
    carry = init
    for c in range(n):
        carry = body(c, carry)
    return carry
