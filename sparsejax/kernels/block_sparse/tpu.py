"""Pallas TPU block-sparse kernels (``pl.pallas_call`` with scalar prefetch); interpret mode on CPU.

The index tables are scalar-prefetch operands. The grid is padded to the
longest column; steps past a column's count skip the dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparsejax.kernels import backends

__all__ = ["gather_matmul", "sampled_matmul"]


def gather_matmul(a, blocks, ptr, idx, *, rows: int, steps: int, interpret: bool, poison: bool):
    """``out[:, j-tile] = sum_{t in col j} a[:, idx[t]-tile] @ blocks[t]``, f32 output.

    Tables travel as scalar-prefetch operands; the grid runs to the longest
    column and shorter columns clamp their block index and skip the dot.
    """
    from jax.experimental.pallas import tpu as pltpu

    m, _ = a.shape
    nnzb, bk, bn = blocks.shape
    ncols = len(ptr) - 1
    steps = max(1, steps)      # the longest column (of any layer, for device tables)
    ptr_a = jnp.asarray(ptr, jnp.int32)
    idx_a = jnp.asarray(idx, jnp.int32)

    def block_id(j, t, ptr_ref):
        last = jnp.maximum(ptr_ref[j + 1] - 1, ptr_ref[j])
        return jnp.clip(jnp.minimum(ptr_ref[j] + t, last), 0, nnzb - 1)

    def a_map(i, j, t, ptr_ref, idx_ref):
        return i, idx_ref[block_id(j, t, ptr_ref)]

    def w_map(i, j, t, ptr_ref, idx_ref):
        return block_id(j, t, ptr_ref), 0, 0

    def o_map(i, j, t, ptr_ref, idx_ref):
        return i, j

    def kernel(ptr_ref, idx_ref, a_ref, w_ref, *rest):
        o_ref = rest[-1]
        j, t = pl.program_id(1), pl.program_id(2)

        @pl.when(t == 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

        @pl.when(t < ptr_ref[j + 1] - ptr_ref[j])
        def _():
            o_ref[...] += jnp.dot(a_ref[...], w_ref[0], preferred_element_type=jnp.float32)

    out_shape = jax.ShapeDtypeStruct((m, ncols * bn), jnp.float32)
    in_specs = [pl.BlockSpec((rows, bk), a_map), pl.BlockSpec((1, bk, bn), w_map)]
    out_spec = pl.BlockSpec((rows, bn), o_map)
    operands = [a, blocks]
    aliases = {}
    if poison:   # tests: every output element must be written over the NaNs
        in_specs.append(out_spec)
        aliases = backends.poison_output(operands, out_shape, scalar_prefetch=2)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(m // rows, ncols, steps),
        in_specs=in_specs, out_specs=out_spec)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                          input_output_aliases=aliases, interpret=interpret)(ptr_a, idx_a, *operands)


def sampled_matmul(a, g, rows_of, cols_of, bk: int, bn: int, *, rows: int, interpret: bool,
                   poison: bool):
    """``out[b] = a[:, rows_of[b]-tile]^T @ g[:, cols_of[b]-tile]`` for each kept block, f32."""
    from jax.experimental.pallas import tpu as pltpu

    m = a.shape[0]
    nnzb = len(rows_of)
    r_a = jnp.asarray(rows_of, jnp.int32)
    c_a = jnp.asarray(cols_of, jnp.int32)

    def kernel(r_ref, c_ref, a_ref, g_ref, *rest):
        o_ref = rest[-1]

        @pl.when(pl.program_id(1) == 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

        o_ref[0] += jax.lax.dot_general(a_ref[...], g_ref[...], (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    out_shape = jax.ShapeDtypeStruct((nnzb, bk, bn), jnp.float32)
    in_specs = [pl.BlockSpec((rows, bk), lambda b, i, r, c: (i, r[b])),
                pl.BlockSpec((rows, bn), lambda b, i, r, c: (i, c[b]))]
    out_spec = pl.BlockSpec((1, bk, bn), lambda b, i, r, c: (b, 0, 0))
    operands = [a, g]
    aliases = {}
    if poison:
        in_specs.append(out_spec)
        aliases = backends.poison_output(operands, out_shape, scalar_prefetch=2)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nnzb, m // rows), in_specs=in_specs, out_specs=out_spec)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                          input_output_aliases=aliases, interpret=interpret)(r_a, c_a, *operands)

