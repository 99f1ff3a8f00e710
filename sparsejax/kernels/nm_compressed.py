"""Compressed N:M weights and their matmul/GEMV kernel: ``y = x @ W``, ``W`` N:M along K.

Convention (as :mod:`sparsejax.layout`): ``W`` is the ``(K, N)`` matrix view and
its N:M groups are ``m`` consecutive rows of one column (the layout
:func:`sparsejax.masks.nm_mask` produces). :func:`compress_nm` keeps the ``n``
values of every group and the position of each inside its group, packed at 2
bits per index for ``m <= 4`` and 4 bits for ``m <= 16``. A 2:4 bf16 weight is
then 0.5 + 0.0625 of its dense bytes, which is what a memory-bound decode GEMV
can turn into speed (at most 1.78x).

Hopper's 2:4 sparse tensor cores are not reachable from Pallas: Mosaic GPU
exposes sparse MMA only for Blackwell (``tcgen05``) and Triton has no sparse
``mma`` for sm_90. So the kernel expands the indices on chip, picks ``x`` at
each kept position (a gathered load, or selects) and multiplies on the CUDA
cores; the gain is fewer bytes, for small batches.

Packed layout, chosen so the kernel never reshapes or interleaves: groups are
cut into tiles of ``group_tile`` groups; inside a tile, byte ``r`` of slot ``t``
holds the indices of groups ``r + e * q`` (``e < 8 / bits``, ``q = group_tile *
bits / 8``) in bit field ``e``. Unpacking field ``e`` of a tile's bytes gives
the indices of a contiguous run of ``q`` groups.

Kept positions are stored in increasing order, so slot ``t`` of a group holds
a position in ``[t, m - n + t]``: the select variant needs ``m - n`` selects per
value and row (2 for 2:4), not ``m``.

The kernel is a ``pl.pallas_call`` (the Triton backend on GPU; interpret mode
on CPU for tests). Its tiles and launch, per backend and batch, come from
:func:`sparsejax.kernels.tile_tables.nm_tiles`; benchmarks override them
through the module's ``X_ACCESS``, ``NUM_WARPS``, ``NUM_STAGES`` and
``TARGET_PROGRAMS``. Elsewhere, and on GPU for batches above ``MAX_KERNEL_BATCH``,
:func:`nm_matmul` uses :func:`nm_matmul_reference` (expand to dense, XLA dot).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sparsejax.kernels import backends, tile_tables
from sparsejax.kernels._triton import compiler_params, next_pow2, pad_to

__all__ = ["NMWeight", "compress_nm", "nm_matmul", "nm_matmul_reference", "supported", "describe"]

MAX_KERNEL_BATCH = 2   # measured on an H100: the kernel loses to dense XLA from batch 4


def _index_bits(m: int) -> int:
    return 2 if m <= 4 else 4


@jax.tree_util.register_pytree_node_class
class NMWeight:
    """A compressed N:M ``(K, N)`` weight (build it with :func:`compress_nm`).

    Leaves: ``values`` (``(n, G_pad, N)``: slot ``t`` of group ``g``) and
    ``meta`` (``(n, G_pad * bits / 8, N)`` uint8, packed positions). Static:
    ``shape``, ``n``, ``m``, ``group_tile``. ``G_pad`` is ``K / m`` rounded up to
    ``group_tile``; padded groups hold zeros.
    """

    def __init__(self, values, meta, shape, n, m, group_tile):
        self.values = values
        self.meta = meta
        self.shape = tuple(shape)
        self.n, self.m, self.group_tile = int(n), int(m), int(group_tile)

    def tree_flatten(self):
        return (self.values, self.meta), (self.shape, self.n, self.m, self.group_tile)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def bits(self) -> int:
        return _index_bits(self.m)

    @property
    def nbytes(self) -> int:
        return int(self.values.size * self.values.dtype.itemsize + self.meta.size)

    def indices(self) -> jax.Array:
        """``(n, G_pad, N)`` int32 positions of the kept values inside their groups."""
        return _unpack(self.meta, self.bits, self.group_tile)

    def to_dense(self) -> jax.Array:
        """The ``(K, N)`` matrix, zeros at the dropped positions."""
        k, n_cols = self.shape
        g = k // self.m
        idx = self.indices()[:, :g]                                   # (n, G, N)
        vals = self.values[:, :g]
        onehot = idx[..., None] == jnp.arange(self.m)                  # (n, G, N, m)
        dense = jnp.sum(jnp.where(onehot, vals[..., None], 0), axis=0)  # (G, N, m)
        return dense.transpose(0, 2, 1).reshape(k, n_cols).astype(self.dtype)

    def __repr__(self):
        return f"NMWeight(shape={self.shape}, n={self.n}, m={self.m}, dtype={self.dtype})"


def _pack(idx: jax.Array, bits: int, group_tile: int) -> jax.Array:
    """``(n, G_pad, N)`` positions -> ``(n, G_pad * bits / 8, N)`` uint8 (see module doc)."""
    n, g_pad, cols = idx.shape
    per = 8 // bits
    q = group_tile // per
    tiles = idx.reshape(n, g_pad // group_tile, per, q, cols).astype(jnp.uint8)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[None, None, :, None, None]
    packed = jnp.sum(tiles << shifts, axis=2, dtype=jnp.uint8)         # fields are disjoint
    return packed.reshape(n, g_pad // per, cols)


def _unpack(meta: jax.Array, bits: int, group_tile: int) -> jax.Array:
    n, rows, cols = meta.shape
    per = 8 // bits
    q = group_tile // per
    tiles = meta.reshape(n, rows // q, 1, q, cols).astype(jnp.int32)
    shifts = (jnp.arange(per, dtype=jnp.int32) * bits)[None, None, :, None, None]
    idx = (tiles >> shifts) & ((1 << bits) - 1)
    return idx.reshape(n, rows * per, cols)


def compress_nm(w: jax.Array, n: int, m: int, mask=None, *, group_tile: int = 64) -> NMWeight:
    """Compresses a ``(K, N)`` weight that is N:M along K.

    Args:
      w: ``(K, N)``, ``K % m == 0``. May be traced.
      n, m: keep ``n`` of every ``m`` consecutive entries along K; ``m <= 16``.
      mask: which entries are kept (N:M: at most ``n`` per group). Default: the
        ``n`` largest ``|w|`` of each group (exactly the nonzeros of an N:M-masked
        weight). Groups with fewer than ``n`` kept entries store zeros.
      group_tile: groups per packed tile (the kernel's K step is ``group_tile * m``);
        a multiple of ``8 / bits``.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"compress_nm: needs ints 0 < n <= m, got n={n!r}, m={m!r}")
    if m > 16:
        raise ValueError(f"compress_nm: m={m} > 16 (indices are packed in at most 4 bits)")
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"compress_nm: w must be a (K, N) matrix, got shape {getattr(w, 'shape', None)}")
    k, cols = w.shape
    if k % m:
        raise ValueError(f"compress_nm: m={m} must divide the reduction size K={k}")
    bits = _index_bits(m)
    if group_tile <= 0 or group_tile % (8 // bits):
        raise ValueError(f"compress_nm: group_tile={group_tile} must be a positive multiple of {8 // bits}")
    w = jnp.asarray(w)
    g = k // m
    grouped = w.reshape(g, m, cols)
    if mask is None:
        score = jnp.abs(grouped.astype(jnp.float32))
    else:
        mask = jnp.asarray(mask)
        if mask.shape != w.shape:
            raise ValueError(f"compress_nm: mask shape {mask.shape} != weight shape {w.shape}")
        kept = mask.reshape(g, m, cols)
        try:
            too_many = int(np.max(np.asarray(kept.sum(axis=1)), initial=0)) > n
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            too_many = False          # traced mask: the caller vouches for its structure
        if too_many:
            raise ValueError(f"compress_nm: mask keeps more than n={n} of some group of m={m}")
        grouped = jnp.where(kept, grouped, 0)
        score = kept.astype(jnp.float32) * 2.0 + (jnp.abs(grouped.astype(jnp.float32)) > 0)
    # Positions of the n kept entries, in increasing order inside each group.
    order = jnp.argsort(-score, axis=1, stable=True)[:, :n]            # (G, n, N)
    idx = jnp.sort(order, axis=1)
    vals = jnp.take_along_axis(grouped, idx, axis=1)                   # (G, n, N)
    g_pad = -(-g // group_tile) * group_tile
    idx = jnp.pad(idx.transpose(1, 0, 2), ((0, 0), (0, g_pad - g), (0, 0)))
    vals = jnp.pad(vals.transpose(1, 0, 2), ((0, 0), (0, g_pad - g), (0, 0)))
    return NMWeight(vals, _pack(idx, bits, group_tile), (k, cols), n, m, group_tile)


# --------------------------------------------------------------------------- reference


def nm_matmul_reference(x: jax.Array, packed: NMWeight) -> jax.Array:
    """Plain-JAX twin of :func:`nm_matmul`: expand to dense, then one XLA dot."""
    _check_operands(x, packed, "nm_matmul_reference")
    return backends.dense_reference(x, packed)


def _check_operands(x, packed, where: str):
    backends.check_packed_operands(x, packed, NMWeight, "an NMWeight (see compress_nm)", where)


_KERNELS = {"gpu": backends.TRITON}


def _resolve(backend, interpret, where: str) -> str:
    return backends.resolve(backend, interpret, kernels=_KERNELS, interpreted=backends.TRITON,
                            where=where)


def supported(shape, dtype, batch: int = 1, *, backend: str | None = None,
              interpret: bool = False) -> str | None:
    """Why the compressed N:M kernel cannot take a ``(K, N)`` weight for ``batch`` rows (``None``: it can).

    ``backend`` (kernel: ``"triton"``), ``interpret``: see :mod:`sparsejax.kernels.backends`.
    Where this returns a reason, :func:`nm_matmul` uses the reference.
    """
    kernel = _resolve(backend, interpret, "supported")
    if len(tuple(shape)) != 2:
        return f"weight shape {tuple(shape)} is not a (K, N) matrix"
    if kernel != backends.TRITON:
        return backends.reference_reason("compressed N:M", backend)
    if interpret:
        if batch > 8:
            return f"batch {batch} > 8: interpret mode unrolls every row; reference"
        return None
    if batch > MAX_KERNEL_BATCH:
        return (f"batch {batch} > {MAX_KERNEL_BATCH}: the GEMV kernel pays only while "
                f"memory-bound; keep the dense (masked) weight on XLA")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"no compressed N:M GPU kernel for dtype {jnp.dtype(dtype)}"
    return None


def describe(backend: str | None = None, interpret: bool = False) -> str:
    """The kernel :func:`nm_matmul` runs with these arguments, in words (reports)."""
    if _resolve(backend, interpret, "describe") != backends.TRITON:
        return "plain-JAX reference"
    return ("compressed N:M kernel in interpret mode" if interpret else
            "compressed N:M GEMV kernel (Pallas, Triton backend)")


# --------------------------------------------------------------------------- kernel


def _nm_kernel(x_ref, v_ref, meta_ref, *rest, n: int, m: int, bits: int, group_tile: int,
               tiles_per_split: int, x_access: str):
    """One output tile of one K split: loop over group tiles, expand indices, multiply-add.

    ``x_ref``: with ``x_access="gather"`` the whole ``(batch, K_pad)`` ``x``, gathered
    at ``group * m + position`` (``x`` is a few KiB, cache-resident); otherwise this
    split's block of the ``(m, batch, G_pad)`` copy (see ``tile_tables.NMTiles``).
    """
    o_ref = rest[-1]
    per = 8 // bits
    q = group_tile // per
    field = (1 << bits) - 1
    _, batch, bn = o_ref.shape
    if x_access == "gather":
        # The whole x is indexed by global group; values and meta are this split's blocks.
        split_first_group = pl.program_id(1) * (tiles_per_split * group_tile)

    def tile_step(i, acc):
        # Elementwise (q, bn) accumulators, one per row of x: the cross-lane sum
        # over groups happens once, after the loop, not once per step.
        acc = list(acc)
        for t in range(n):
            meta = meta_ref[t, pl.ds(i * q, q), :].astype(jnp.int32)                 # (q, bn)
            for e in range(per):
                idx = (meta >> (e * bits)) & field                                  # (q, bn)
                g0 = i * group_tile + e * q
                vals = v_ref[t, pl.ds(g0, q), :].astype(jnp.float32)                 # (q, bn)
                if x_access == "gather":
                    groups = split_first_group + g0 + jnp.arange(q, dtype=jnp.int32)
                    positions = groups[:, None] * m + idx                           # (q, bn) along K
                elif x_access == "gather_grouped":
                    groups = jnp.broadcast_to((g0 + jnp.arange(q, dtype=jnp.int32))[:, None], (q, bn))
                for b in range(batch):
                    if x_access == "gather":
                        sel = x_ref[b, positions].astype(jnp.float32)               # (q, bn)
                    elif x_access == "gather_grouped":
                        sel = x_ref[idx, b, groups].astype(jnp.float32)              # (q, bn)
                    else:
                        # Kept positions are stored in increasing order, so slot t holds a
                        # position in [t, m - n + t]: m - n selects, starting from the first.
                        first = x_ref[t, b, pl.ds(g0, q)].astype(jnp.float32)
                        sel = jnp.broadcast_to(first[:, None], (q, bn))
                        for p in range(t + 1, m - n + t + 1):
                            xp = x_ref[p, b, pl.ds(g0, q)].astype(jnp.float32)      # (q,)
                            sel = jnp.where(idx == p, xp[:, None], sel)
                    acc[b] = acc[b] + sel * vals
        return tuple(acc)

    init = tuple(jnp.zeros((q, bn), jnp.float32) for _ in range(batch))
    acc = jax.lax.fori_loop(0, tiles_per_split, tile_step, init)
    for b in range(batch):
        o_ref[0, b, :] = jnp.sum(acc[b], axis=0)


def _nm_call(x, values, meta, *, n, m, bits, group_tile, tiles, splits, interpret, poison):
    """Per-split partial sums ``(splits, batch, N_pad)`` f32; ``x`` as ``tiles.x_access`` reads it."""
    batch = x.shape[0] if tiles.x_access == "gather" else x.shape[1]
    cols = values.shape[2]
    per = 8 // bits
    g_split = values.shape[1] // splits
    cols_tile = tiles.cols
    out_shape = jax.ShapeDtypeStruct((splits, batch, cols), jnp.float32)
    if tiles.x_access == "gather":
        x_spec = pl.BlockSpec(x.shape, lambda j, s: (0, 0))      # whole x: gathers reach any group
    else:
        x_spec = pl.BlockSpec((m, batch, g_split), lambda j, s: (0, 0, s))
    in_specs = [
        x_spec,
        pl.BlockSpec((n, g_split, cols_tile), lambda j, s: (0, s, j)),
        pl.BlockSpec((n, g_split // per, cols_tile), lambda j, s: (0, s, j)),
    ]
    out_spec = pl.BlockSpec((1, batch, cols_tile), lambda j, s: (s, 0, j))
    operands = [x, values, meta]
    aliases = {}
    if poison:   # tests: every output element must be written over the NaNs
        in_specs.append(out_spec)
        aliases = backends.poison_output(operands, out_shape)
    kernel = functools.partial(_nm_kernel, n=n, m=m, bits=bits, group_tile=group_tile,
                               tiles_per_split=g_split // group_tile, x_access=tiles.x_access)
    params = {}
    if not interpret and jax.default_backend() == "gpu":
        params["compiler_params"] = compiler_params(tiles.num_warps, tiles.num_stages)
    return pl.pallas_call(kernel, grid=(cols // cols_tile, splits), in_specs=in_specs,
                          out_specs=out_spec, out_shape=out_shape, input_output_aliases=aliases,
                          interpret=interpret, **params)(*operands)


# Sweep overrides of the launch in tile_tables.nm_tiles (benchmarks set and restore them;
# read when a call is traced). None: the table's value for the backend and batch.
X_ACCESS: str | None = None
NUM_WARPS: int | None = None
NUM_STAGES: int | None = None
TARGET_PROGRAMS: int | None = None


def _launch_tiles(interpret: bool, batch: int, cols: int) -> tile_tables.NMTiles:
    """The table's launch for ``batch`` rows, ``cols`` outputs per program, overrides applied."""
    overrides = {"x_access": X_ACCESS, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES,
                 "target_programs": TARGET_PROGRAMS}
    tiles = tile_tables.nm_tiles("interpret" if interpret else "gpu", batch)
    return dataclasses.replace(tiles, cols=cols, **{k: v for k, v in overrides.items() if v is not None})


def _choose_splits(tiles: int, col_tiles: int, target_programs: int) -> int:
    """Split K so there are enough programs to fill the GPU (a GEMV has few output tiles)."""
    splits = 1
    while col_tiles * splits < target_programs and tiles % (splits * 2) == 0:
        splits *= 2
    return splits


def nm_matmul(x: jax.Array, packed: NMWeight, *, backend: str | None = None,
              interpret: bool = False, poison: bool = False) -> jax.Array:
    """``x @ W`` for a compressed N:M ``W``; a GEMV kernel for small batches.

    Args:
      x: ``(..., K)``; on GPU the kernel runs when the flattened batch is at
        most ``MAX_KERNEL_BATCH`` (decode); larger batches use the reference.
      packed: from :func:`compress_nm`.
      backend: ``"triton"``, ``"reference"`` or a platform (default: JAX's default
        platform's kernel; see :mod:`sparsejax.kernels.backends`).
      interpret: run the kernel in interpret mode (CPU tests).
      poison: fill the kernel's output with NaN before it writes it (tests).

    Differentiable: the backward pass expands ``W`` once (``dx = dy @ W^T``) and
    gathers ``dW`` at the kept positions.
    """
    _check_operands(x, packed, "nm_matmul")
    kernel = _resolve(backend, interpret, "nm_matmul")
    dtype = jnp.result_type(x.dtype, packed.dtype)
    lead = x.shape[:-1]
    batch = math.prod(lead)
    if supported(packed.shape, dtype, batch, backend=kernel, interpret=interpret) is not None \
            or batch == 0:
        return nm_matmul_reference(x, packed)
    tiles = tile_tables.nm_tiles("interpret" if interpret else "gpu", batch)
    y = _nm_apply(x.reshape(batch, -1).astype(dtype), packed.values.astype(dtype), packed.meta,
                  (packed.shape, packed.n, packed.m, packed.group_tile, tiles.cols,
                   bool(interpret), bool(poison)))
    return y.reshape(*lead, packed.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nm_apply(x2, values, meta, static):
    (k, cols), n, m, group_tile, cols_tile, interpret, poison = static
    bits = _index_bits(m)
    batch = x2.shape[0]
    g = k // m
    g_pad = values.shape[1]
    tiles = _launch_tiles(interpret, batch, min(cols_tile, next_pow2(cols)))
    cols_pad = -(-cols // tiles.cols) * tiles.cols
    if tiles.x_access == "gather":
        # x as it is; zeros for the padded groups (if any), whose positions lie past K.
        x_in = pad_to(x2, 1, group_tile * m)
    else:
        # x as (m, batch, G): position p of every group is one contiguous row. Triton
        # blocks need power-of-two sizes: pad the batch (at most MAX_KERNEL_BATCH rows).
        x2_pad = jnp.pad(x2, ((0, next_pow2(batch) - batch), (0, 0)))
        x_in = x2_pad.reshape(x2_pad.shape[0], g, m).transpose(2, 0, 1)
        x_in = jnp.pad(x_in, ((0, 0), (0, 0), (0, g_pad - g)))
    values = jnp.pad(values, ((0, 0), (0, 0), (0, cols_pad - cols)))
    meta = jnp.pad(meta, ((0, 0), (0, 0), (0, cols_pad - cols)))
    splits = _choose_splits(g_pad // group_tile, cols_pad // tiles.cols, tiles.target_programs)
    partial = _nm_call(x_in, values, meta, n=n, m=m, bits=bits, group_tile=group_tile, tiles=tiles,
                       splits=splits, interpret=interpret, poison=poison)
    return jnp.sum(partial, axis=0)[:batch, :cols].astype(x2.dtype)


def _nm_apply_fwd(x2, values, meta, static):
    return _nm_apply(x2, values, meta, static), (x2, values, meta)


def _nm_apply_bwd(static, residuals, g):
    x2, values, meta = residuals
    (k, cols), n, m, group_tile, *_ = static
    w = NMWeight(values, meta, (k, cols), n, m, group_tile)
    dx = jnp.matmul(g.astype(x2.dtype), w.to_dense().T, preferred_element_type=jnp.float32)
    # dW at the kept positions: (x^T g)[g * m + idx, col] for every slot.
    grp = k // m
    idx = w.indices()                                                   # (n, G_pad, N)
    xg = x2.reshape(x2.shape[0], grp, m)
    xg = jnp.pad(xg, ((0, 0), (0, values.shape[1] - grp), (0, 0)))       # (B, G_pad, m)
    onehot = (idx[..., None] == jnp.arange(m)).astype(jnp.float32)       # (n, G_pad, N, m)
    x_at = jnp.einsum("bgp,tgcp->btgc", xg.astype(jnp.float32), onehot)
    dvals = jnp.einsum("btgc,bc->tgc", x_at, g.astype(jnp.float32))
    return dx.astype(x2.dtype), dvals.astype(values.dtype), None


_nm_apply.defvjp(_nm_apply_fwd, _nm_apply_bwd)
