"""Top-k gated FFN at decode: compute only the neurons that fire.

A gated FFN ``y = (act(x_g @ W_g) * (x_u @ W_u)) @ W_d`` whose activation is
statistically top-k sparse (Spark FFN, or any gated FFN after the top-k pass)
needs, for a decode batch of 1 to 8 tokens:

1. the *selector*: the gate pre-activation ``x_g @ W_g`` (Spark: only the first
   ``r`` input dims and rows, the predictor), dense;
2. statistical top-k on it and the activation; the union over the batch of the
   neurons that fired, compacted into an index list of fixed ``capacity``;
3. the *gathered* part: for those neurons only, the matching rows of ``W_u^T``
   and of ``W_d``: ``y = sum_j h[:, j] W_d[j]``, ``h = act[:, j] * (x_u . W_u^T[j])``.

At decode everything is memory-bound, so the cost is the weight bytes read: the
selector's ``r x d_ff`` plus ``2 x active x d`` instead of ``3 x d x d_ff``.

:class:`DecodeWeights` stores the layout the gathered part wants (rows of
``W_u^T`` and ``W_d`` are contiguous per neuron); build it once with
:func:`decode_weights_from_spark` or :func:`decode_weights_from_gated`.

Paths for the gathered part (:func:`gathered_ffn`):

* ``"xla"``: gather the rows, then two dots (static shapes: the cost follows
  ``capacity``); ``lax.cond`` to the dense product when the union overflows.
* ``"pallas"``: two ``pl.pallas_call`` kernels (Triton backend on GPU; interpret
  mode on CPU) that read the neuron count from memory and loop over the active
  neurons only, gathering weight rows by index inside the kernel; past
  ``capacity`` they walk all ``d_ff`` neurons instead (the dense fallback, in
  the same launch). Cost follows the actual count.
* ``"sparse"``: two Pallas kernels with masked loads and no index list (TEAL's
  design, see :mod:`sparsejax.kernels.sparse_input_gemv`): a sparse-*output*
  GEMV computes ``h = act * (x_up . W_u^T[j])`` loading only the rows of
  ``W_u^T`` whose neuron fired for some token, then the sparse-*input* GEMV
  ``y = h @ W_d`` loads only the rows of ``W_d`` with a live ``h``.
* ``"fused"``: both in one Pallas kernel: a program owns a tile of neurons, loads
  their live up rows, forms ``h`` on chip and adds ``h @ W_d[tile]`` into ``y``
  with atomics. One launch after the selection; cost follows the live rows.
* ``"reference"``: :func:`gathered_ffn_reference`, dense, exact.

The two masked paths need no ``capacity`` and never overflow. :func:`choose_impl`
picks, per batch size, the fastest of them and the dense product by measurement
(:mod:`sparsejax.kernels.path_choice`): the union of fired neurons grows with the
batch, and past some batch the dense product wins.

An overflow never gives a wrong answer: every path then computes all neurons.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sparsejax.kernels import backends, path_choice, streaming_choice
from sparsejax.kernels import sparse_input_gemv as sig
from sparsejax.kernels import sparse_output_gemv as sog
from sparsejax.kernels import statistical_topk as stk
from sparsejax.kernels._triton import compiler_params, loop, next_pow2, pad_to
from sparsejax.kernels.sparse_input_gemv import pltriton
from sparsejax.topk import resolve_k_frac, statistical_threshold

__all__ = [
    "DecodeWeights",
    "decode_weights_from_spark",
    "decode_weights_from_gated",
    "select_neurons",
    "gathered_ffn",
    "gathered_ffn_reference",
    "topk_ffn_decode",
    "topk_ffn_decode_reference",
    "MAX_BATCH",
    "choose_impl",
    "supported",
]

MAX_BATCH = 8
_IMPLS = ("xla", "pallas", "sparse", "fused", "reference")
_MASKED_IMPLS = ("sparse", "fused")
_KERNEL_IMPLS = ("pallas",) + _MASKED_IMPLS
_KERNELS = {"gpu": backends.TRITON}


def supported(batch: int, *, backend: str | None = None, interpret: bool = False) -> str | None:
    """Why the Pallas paths (``"pallas"``, ``"sparse"``, ``"fused"``) cannot run ``batch`` rows here.

    ``None`` when they can. ``backend`` (kernel: ``"triton"``), ``interpret``: see
    :mod:`sparsejax.kernels.backends`.
    """
    kernel = backends.resolve(backend, interpret, kernels=_KERNELS, interpreted=backends.TRITON,
                              where="supported")
    if batch > MAX_BATCH:
        return f"batch {batch} > {MAX_BATCH}"
    if kernel != backends.TRITON:
        return backends.reference_reason("Spark FFN decode", backend)
    return None


@jax.tree_util.register_pytree_node_class
class DecodeWeights:
    """Decode-layout weights of a top-k gated FFN.

    Leaves: ``w_gate`` ``(d_gate_in, d_ff)`` (selector), ``w_up_t`` ``(d_ff,
    d_up_in)`` (up projection, transposed so each neuron's weights are one row),
    ``w_down`` ``(d_ff, d_model)``. Static: ``split`` -- ``None`` when gate and up
    both read all of ``x`` (a plain gated FFN), or ``r`` when the gate reads
    ``x[:, :r]`` and the up projection ``x[:, r:]`` (Spark FFN).
    """

    def __init__(self, w_gate, w_up_t, w_down, split):
        self.w_gate, self.w_up_t, self.w_down, self.split = w_gate, w_up_t, w_down, split

    def tree_flatten(self):
        return (self.w_gate, self.w_up_t, self.w_down), self.split

    @classmethod
    def tree_unflatten(cls, split, children):
        return cls(*children, split)

    @property
    def d_ff(self) -> int:
        return self.w_down.shape[0]

    @property
    def d_model(self) -> int:
        return self.w_down.shape[1]

    def gate_input(self, x):
        return x if self.split is None else x[..., :self.split]

    def up_input(self, x):
        return x if self.split is None else x[..., self.split:]


def decode_weights_from_spark(wi: jax.Array, wo: jax.Array, predictor_dims: int) -> DecodeWeights:
    """From a Spark FFN's merged ``wi`` ``(d_model, d_ff)`` (first ``r`` rows: the
    predictor/gate, the rest: up) and ``wo`` ``(d_ff, d_model)``."""
    if wi.ndim != 2 or wo.ndim != 2 or wo.shape != wi.shape[::-1]:
        raise ValueError(f"decode_weights_from_spark: wi must be (d_model, d_ff) and wo (d_ff, d_model); "
                         f"got {wi.shape} and {wo.shape}")
    if not 0 < predictor_dims < wi.shape[0]:
        raise ValueError(f"decode_weights_from_spark: predictor_dims must satisfy 0 < r < d_model = "
                         f"{wi.shape[0]}, got {predictor_dims}")
    return DecodeWeights(wi[:predictor_dims], wi[predictor_dims:].T, wo, predictor_dims)


def decode_weights_from_gated(w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> DecodeWeights:
    """From a plain gated FFN: ``w_gate``, ``w_up`` ``(d_model, d_ff)``, ``w_down`` ``(d_ff, d_model)``."""
    if w_gate.shape != w_up.shape or w_down.shape != w_up.shape[::-1]:
        raise ValueError(f"decode_weights_from_gated: need w_gate, w_up (d_model, d_ff) and w_down "
                         f"(d_ff, d_model); got {w_gate.shape}, {w_up.shape}, {w_down.shape}")
    return DecodeWeights(w_gate, w_up.T, w_down, None)


# --------------------------------------------------------------------------- selection


def select_neurons(pre: jax.Array, *, k: Any = None, k_frac: Any = None, capacity: int,
                   activation: Callable = jax.nn.gelu, soft: bool = True):
    """Statistical top-k of the gate pre-activation and the union of fired neurons.

    Args:
      pre: ``(B, d_ff)`` gate pre-activations (float32 preferred).
      k, k_frac: neurons kept per row (see :func:`sparsejax.topk.statistical_topk`).
      capacity: length of the index list; more active neurons than this is an
        overflow (the gathered part then computes all neurons).
      activation: applied to the soft top-k output (``act(max(pre - theta, 0))``,
        Spark) or, with ``soft=False``, to the kept pre-activations.

    Returns:
      ``act`` ``(B, d_ff)`` float32 (zero outside each row's selection), ``idx``
      ``(capacity,)`` int32 (the union, ascending; entries past ``count`` are 0),
      ``count`` int32 scalar (size of the union; ``> capacity`` means overflow).
    """
    d_ff = pre.shape[-1]
    if not isinstance(capacity, (int, np.integer)) or not 0 < capacity <= d_ff:
        raise ValueError(f"select_neurons: capacity must be an int in (0, d_ff = {d_ff}], got {capacity!r}")
    pre = pre.astype(jnp.float32)
    theta = statistical_threshold(pre, k=k, k_frac=k_frac, axis=-1)
    keep = pre > theta
    act = jnp.where(keep, activation(pre - theta if soft else pre), 0.0)
    fired = jnp.any(keep, axis=0)
    pos = jnp.cumsum(fired.astype(jnp.int32)) - 1
    count = pos[-1] + 1
    slot = jnp.where(fired & (pos < capacity), pos, capacity)          # capacity: dropped
    idx = jnp.zeros((capacity,), jnp.int32).at[slot].set(jnp.arange(d_ff, dtype=jnp.int32), mode="drop")
    return act, idx, count


# --------------------------------------------------------------------------- gathered part


def gathered_ffn_reference(x_up, act, w_up_t, w_down):
    """Dense twin of :func:`gathered_ffn`: ``(act * (x_up @ W_u)) @ W_d`` in float32."""
    up = jnp.dot(x_up, w_up_t.T, preferred_element_type=jnp.float32)
    h = (act.astype(jnp.float32) * up).astype(w_down.dtype)
    return jnp.dot(h, w_down, preferred_element_type=jnp.float32)


def _gathered_xla(x_up, act, w_up_t, w_down, idx, count):
    capacity = idx.shape[0]

    def sparse(_):
        live = jnp.arange(capacity) < count          # entries past count point at neuron 0
        rows_up = jnp.take(w_up_t, idx, axis=0)
        up = jnp.dot(x_up, rows_up.T, preferred_element_type=jnp.float32)
        h = jnp.where(live, jnp.take(act, idx, axis=1) * up, 0.0).astype(w_down.dtype)
        return jnp.dot(h, jnp.take(w_down, idx, axis=0), preferred_element_type=jnp.float32)

    def dense(_):
        return gathered_ffn_reference(x_up, act, w_up_t, w_down)

    return jax.lax.cond(count <= capacity, sparse, dense, None)


def _cdiv(a, b):
    return (a + b - 1) // b


def _live_neurons(meta_ref, idx_ref, p0, *, bc, capacity, d_ff):
    """Neuron ids at positions ``p0 .. p0 + bc``: from the index list, or the
    positions themselves after an overflow; and which positions are live."""
    count = meta_ref[0]
    overflow = count > capacity
    n_live = jnp.where(overflow, d_ff, count)
    pos = p0 + jnp.arange(bc, dtype=jnp.int32)
    listed = idx_ref[pl.ds(jnp.minimum(p0, idx_ref.shape[0] - bc), bc)]
    live = pos < n_live
    neuron = jnp.where(overflow, pos, listed)
    return jnp.where(live, neuron, 0), live            # dead positions read neuron 0, then drop it


def _n_chunks(meta_ref, *, bc, capacity, d_ff):
    count = meta_ref[0]
    return _cdiv(jnp.where(count > capacity, d_ff, count), bc)


def _up_kernel(meta_ref, idx_ref, x_ref, act_ref, w_ref, *rest, bc, bk, programs, capacity, d_ff):
    """h[p] = act[:, n_p] * (x_up . W_u^T[n_p]) for the live positions p of this program."""
    h_ref = rest[-1]                      # rest = (poisoned output alias, output) or (output,)
    s = pl.program_id(0)
    chunks = _n_chunks(meta_ref, bc=bc, capacity=capacity, d_ff=d_ff)
    trips = _cdiv(jnp.maximum(chunks - s, 0), programs)
    n_k = w_ref.shape[1] // bk

    def chunk(t, carry):
        p0 = (s + t * programs) * bc
        neuron, live = _live_neurons(meta_ref, idx_ref, p0, bc=bc, capacity=capacity, d_ff=d_ff)

        def k_step(c, acc):
            w = w_ref[neuron, pl.ds(c * bk, bk)].astype(jnp.float32)          # (bc, bk) gathered rows
            xv = x_ref[:, pl.ds(c * bk, bk)].astype(jnp.float32)              # (B, bk)
            return acc + jnp.sum(w[:, None, :] * xv[None, :, :], axis=-1)     # (bc, B)

        up = jax.lax.fori_loop(0, n_k, k_step, jnp.zeros((bc, x_ref.shape[0]), jnp.float32))
        a = act_ref[neuron, :]                                                  # (bc, B)
        h_ref[pl.ds(p0, bc), :] = jnp.where(live[:, None], a * up, 0.0)
        return carry

    jax.lax.fori_loop(0, trips, chunk, 0)


def _down_kernel(meta_ref, idx_ref, h_ref, w_ref, *rest, bc, bn, splits, capacity, d_ff):
    """One column tile of one split: sum over its live positions of h[p] * W_d[n_p]."""
    o_ref = rest[-1]
    t, s = pl.program_id(0), pl.program_id(1)
    chunks = _n_chunks(meta_ref, bc=bc, capacity=capacity, d_ff=d_ff)
    trips = _cdiv(jnp.maximum(chunks - s, 0), splits)

    def chunk(i, acc):
        p0 = (s + i * splits) * bc
        neuron, live = _live_neurons(meta_ref, idx_ref, p0, bc=bc, capacity=capacity, d_ff=d_ff)
        w = w_ref[neuron, pl.ds(t * bn, bn)].astype(jnp.float32)               # (bc, bn)
        h = jnp.where(live[:, None], h_ref[pl.ds(p0, bc), :], 0.0)              # (bc, B)
        return acc + jnp.sum(h[:, :, None] * w[:, None, :], axis=0)             # (B, bn)

    acc = jax.lax.fori_loop(0, trips, chunk, jnp.zeros((h_ref.shape[1], bn), jnp.float32))
    o_ref[s, :, pl.ds(t * bn, bn)] = acc


def _gathered_pallas(x_up, act, w_up_t, w_down, idx, count, *, bc, bk, bn, up_programs, splits,
                     num_warps, interpret, poison):
    batch = x_up.shape[0]
    d_ff, d_out = w_down.shape
    capacity = idx.shape[0]
    b_pad = next_pow2(batch)                 # Triton tensors have power-of-two shapes
    # Zero padding never changes the answer; real decode weights are prepared already
    # padded (see pad_decode_weights), so these are no-ops on the fast path.
    w_up_t = pad_to(w_up_t, 1, bk)
    w_down = pad_to(w_down, 1, bn)
    x_up = pad_to(jnp.pad(x_up, ((0, 0), (0, w_up_t.shape[1] - x_up.shape[1]))), 0, b_pad)
    act_t = pad_to(act.astype(jnp.float32), 0, b_pad).T                     # (d_ff, B)
    idx = pad_to(idx, 0, bc)
    meta = jnp.reshape(count.astype(jnp.int32), (1,))
    h_rows = _cdiv(d_ff, bc) * bc
    compiler = dict(compiler_params=compiler_params(num_warps, num_stages=2)) if not interpret else {}

    h_shape = jax.ShapeDtypeStruct((h_rows, b_pad), jnp.float32)
    up_args = [meta, idx, x_up, act_t, w_up_t]
    aliases = {}
    if poison:    # tests: live rows must be written over the NaNs (dead rows are never read)
        aliases = backends.poison_output(up_args, h_shape)
    up = functools.partial(_up_kernel, bc=bc, bk=bk, programs=up_programs, capacity=capacity, d_ff=d_ff)
    h = pl.pallas_call(up, grid=(up_programs,), out_shape=h_shape, input_output_aliases=aliases,
                       interpret=interpret, **compiler)(*up_args)

    o_shape = jax.ShapeDtypeStruct((splits, b_pad, w_down.shape[1]), jnp.float32)
    down_args = [meta, idx, h, w_down]
    aliases = {}
    if poison:
        aliases = backends.poison_output(down_args, o_shape)
    down = functools.partial(_down_kernel, bc=bc, bn=bn, splits=splits, capacity=capacity, d_ff=d_ff)
    partial = pl.pallas_call(down, grid=(w_down.shape[1] // bn, splits), out_shape=o_shape,
                             input_output_aliases=aliases, interpret=interpret, **compiler)(*down_args)
    return jnp.sum(partial, axis=0)[:batch, :d_out]


def gathered_ffn(x_up: jax.Array, act: jax.Array, w_up_t: jax.Array, w_down: jax.Array,
                 idx: jax.Array, count: jax.Array, *, impl: str = "xla", interpret: bool = False,
                 poison: bool = False, bc: int = 16, bk: int = 128, bn: int = 128,
                 up_programs: int = 128, splits: int = 16, num_warps: int = 4) -> jax.Array:
    """The FFN over the selected neurons: ``sum_{j in idx[:count]} act[:, j] (x_up . W_u^T[j]) W_d[j]``.

    Args:
      x_up: ``(B, d_up_in)``, ``B <= MAX_BATCH``.
      act: ``(B, d_ff)`` activations, zero outside each row's selection.
      w_up_t: ``(d_ff, d_up_in)``; w_down: ``(d_ff, d_model)``.
      idx, count: from :func:`select_neurons`; ``idx[:count]`` must cover every
        neuron with a nonzero ``act`` unless ``count > len(idx)`` (overflow: all
        neurons are computed).
      impl: ``"xla"``, ``"pallas"`` or ``"reference"`` (see the module doc).
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      poison: NaN-fill the kernels' outputs before they write them (tests).
      bc, bk, bn, up_programs, splits, num_warps: Pallas tiling (powers of two).

    Returns:
      ``(B, d_model)`` float32.
    """
    if impl not in _IMPLS:
        raise ValueError(f"gathered_ffn: impl must be one of {_IMPLS}, got {impl!r}")
    if x_up.ndim != 2 or act.ndim != 2 or act.shape[0] != x_up.shape[0]:
        raise ValueError(f"gathered_ffn: x_up must be (B, d_up_in) and act (B, d_ff); got {x_up.shape}, "
                         f"{act.shape}")
    if (w_up_t.ndim != 2 or w_up_t.shape[0] != act.shape[1] or w_up_t.shape[1] < x_up.shape[1]
            or w_down.ndim != 2 or w_down.shape[0] != act.shape[1]):
        raise ValueError(f"gathered_ffn: w_up_t must be (d_ff, d_up_in) = {(act.shape[1], x_up.shape[1])} "
                         f"(columns may be zero-padded) and w_down (d_ff, d_model); got {w_up_t.shape}, "
                         f"{w_down.shape}")
    if idx.ndim != 1:
        raise ValueError(f"gathered_ffn: idx must be 1-D (the index list), got shape {idx.shape}")
    if impl == "reference":
        return gathered_ffn_reference(x_up, act, w_up_t[:, :x_up.shape[1]], w_down)
    if impl == "xla":
        return _gathered_xla(x_up, act, w_up_t[:, :x_up.shape[1]], w_down, idx, count)
    if x_up.shape[0] > MAX_BATCH:
        raise ValueError(f"gathered_ffn: impl='pallas' handles batch <= {MAX_BATCH} (decode), "
                         f"got {x_up.shape[0]}; use impl='xla'")
    for name, v in dict(bc=bc, bk=bk, bn=bn).items():
        if v & (v - 1) or v <= 0:
            raise ValueError(f"gathered_ffn: {name} must be a power of two, got {v}")
    return _gathered_pallas(x_up, act, w_up_t, w_down, idx, count, bc=bc, bk=bk, bn=bn,
                            up_programs=up_programs, splits=splits, num_warps=num_warps,
                            interpret=interpret, poison=poison)


# --------------------------------------------------------------------------- masked paths


def _live_act(act_ref, rows, batch, theta_ref=None, activation=None):
    """Each token's activations at ``rows`` and the union of fired neurons there.

    With ``activation``, ``act_ref`` holds the gate pre-activations and ``theta_ref``
    each token's top-k threshold: the soft top-k and the activation are applied here
    (one XLA launch fewer than forming ``act`` first).
    """
    acts, live = [], None
    for b in range(batch):
        if activation is None:
            a = act_ref[b, rows]
            fired = a != 0
        else:
            pre, theta = act_ref[b, rows], theta_ref[b]
            fired = pre > theta
            a = jnp.where(fired, activation(pre - theta), 0.0)
        acts.append(a)
        live = fired if live is None else live | fired
    return acts, live


def _live_act_block(act_ref, rows, b_pad, theta_ref=None, activation=None):
    """:func:`_live_act` for the tensor-core kernel: the ``(b_pad, bj)`` block at once.

    Rows past the batch are zeros (and their thresholds zeros): they fire nothing."""
    pre = act_ref[pl.ds(0, b_pad), rows]
    if activation is None:
        fired, a = pre != 0, pre
    else:
        theta = theta_ref[pl.ds(0, b_pad)][:, None]
        fired = pre > theta
        a = jnp.where(fired, activation(pre - theta), 0.0)
    live = jnp.max(fired.astype(jnp.int32), axis=0) > 0
    return a, live


def _masked_rows(w_ref, rows, cols, live, atomic):
    """``W[rows, cols]`` in float32 with dead rows never read (zeros)."""
    return sog.load_live_rows(w_ref, rows, cols, live, atomic).astype(jnp.float32)


def _up_rows(x_ref, w_ref, rows, live, batch, bk, atomic, unroll, x_offset=0):
    """``x_up[b] . W_u^T[j]`` for the neurons ``j`` in ``rows``, loading live rows only;
    ``x_up`` is ``x_ref``'s columns from ``x_offset`` on."""
    def step(c, acc):
        cols = pl.ds(c * bk, bk)
        w = _masked_rows(w_ref, rows, cols, live, atomic)
        xs = pl.ds(x_offset + c * bk, bk)
        return tuple(a + jnp.sum(w * x_ref[b, xs].astype(jnp.float32)[None, :], axis=1)
                     for b, a in enumerate(acc))

    init = tuple(jnp.zeros((live.shape[0],), jnp.float32) for _ in range(batch))
    return loop(w_ref.shape[1] // bk, step, init, unroll)


def _up_kernel_mma(x_ref, act_ref, w_ref, *rest, bj, bk, atomic, unroll, activation=None,
                   x_offset=0):
    """:func:`_up_kernel_masked` on the tensor cores, for a batch of several tokens: each
    step multiplies the ``(b_pad, bk)`` inputs by the tile's live up rows (``b_pad >= 16``,
    zero rows past the batch), where the CUDA-core form reduces one product row per token."""
    h_ref = rest[-1]
    theta_ref = rest[0] if activation is not None else None
    rows = pl.ds(pl.program_id(0) * bj, bj)
    act, live = _live_act_block(act_ref, rows, h_ref.shape[0], theta_ref, activation)
    up = sog.live_rows_product(x_ref, w_ref, rows, live, bk=bk, atomic=atomic, unroll=unroll,
                               x_offset=x_offset)
    h_ref[:, rows] = (act * up).astype(h_ref.dtype)


def _up_kernel_masked(x_ref, act_ref, w_ref, *rest, bj, bk, batch, atomic, unroll,
                      activation=None, x_offset=0):
    """``h[:, tile] = act * (x_up @ W_u)`` over one tile of neurons (dead ones: 0); with
    ``activation``, ``act_ref`` holds the pre-activations and ``rest[0]`` the thresholds."""
    h_ref = rest[-1]
    theta_ref = rest[0] if activation is not None else None
    rows = pl.ds(pl.program_id(0) * bj, bj)
    acts, live = _live_act(act_ref, rows, batch, theta_ref, activation)
    up = _up_rows(x_ref, w_ref, rows, live, batch, bk, atomic, unroll, x_offset)
    for b in range(batch):
        h_ref[pl.ds(b, 1), rows] = (acts[b] * up[b])[None, :].astype(h_ref.dtype)


def _fused_kernel(x_ref, act_ref, wu_ref, wd_ref, *rest, bj, bk, bn, batch, atomic, unroll,
                  partials, activation=None, x_offset=0):
    """One tile of neurons, end to end: live up rows -> ``h`` on chip -> ``y += h @ W_d[tile]``.

    ``partials``: write this tile's contribution to its own row of a partial-sum
    buffer (summed in XLA after) instead of atomics. Triton's atomics are
    acquire-release: each one waits for its round trip before the next load issues.
    """
    y_ref = rest[-1]
    theta_ref = rest[0] if activation is not None else None
    i = pl.program_id(0)
    rows = pl.ds(i * bj, bj)
    acts, live = _live_act(act_ref, rows, batch, theta_ref, activation)
    up = _up_rows(x_ref, wu_ref, rows, live, batch, bk, atomic, unroll, x_offset)
    h = [acts[b] * up[b] for b in range(batch)]

    def step(c, carry):
        cols = pl.ds(c * bn, bn)
        w = _masked_rows(wd_ref, rows, cols, live, atomic)
        for b in range(batch):
            part = jnp.sum(h[b][:, None] * w, axis=0)[None, :]
            if partials:
                y_ref[i, pl.ds(b, 1), cols] = part
            elif atomic:
                pltriton.atomic_add(y_ref, (pl.ds(b, 1), cols), part)
            else:
                y_ref[pl.ds(b, 1), cols] = y_ref[pl.ds(b, 1), cols] + part
        return carry

    loop(wd_ref.shape[1] // bn, step, 0, unroll)


def masked_ffn(x_up: jax.Array, act: jax.Array, w_up_t: jax.Array, w_down: jax.Array, *,
               fused: bool = True, bj: int = 32, bk: int = 256, bn: int = 256, num_warps: int = 4,
               num_stages: int = 2, unroll: bool = True, partials: bool = False,
               down_tiles: dict | None = None, theta: jax.Array | None = None,
               activation: Callable | None = None, x_offset: int = 0, mma: bool = False,
               interpret: bool = False, poison: bool = False) -> jax.Array:
    """``(act * (x_up @ W_u)) @ W_d`` reading only the rows of fired neurons (module doc:
    ``"fused"`` and ``"sparse"``). ``act`` is ``(B', d_ff)``, zero where a neuron did not
    fire; its rows past ``x_up``'s ``B`` are not read. ``bk``/``bn`` should divide
    ``d_up_in``/``d_model`` (else the weights are zero-padded per call); ``unroll`` unrolls
    the loops over them; ``partials`` (fused) sums per-tile partials in XLA instead of
    atomics. With ``theta`` ``(B,)`` and ``activation``, ``act`` holds the gate
    pre-activations and the (fused, or up) kernel forms ``activation(pre - theta)`` where
    ``pre > theta`` itself: two XLA launches fewer.
    ``x_offset``: the up input is ``x_up``'s columns from there on (pass the whole token:
    a kernel's operand cut from it would be a copy, one launch).
    ``mma`` (the two-kernel path): the up kernel multiplies on the tensor cores, the batch
    padded to 16 rows (``bj``, ``bk`` at least 16); the down projection too unless
    ``down_tiles`` says ``mma=False``. Returns ``(B, d_model)`` float32."""
    batch = x_up.shape[0]
    limit = sig.MAX_MMA_BATCH if mma else MAX_BATCH      # mma: rows already padded to 16 pass whole
    if batch > limit:
        raise ValueError(f"masked_ffn: batch {batch} > {limit}; use impl='xla'")
    for name, v in dict(bj=bj, bk=bk, bn=bn).items():
        if v <= 0 or v & (v - 1):
            raise ValueError(f"masked_ffn: {name} must be a power of two, got {v}")
    if mma and (fused or min(bj, bk) < 16):
        raise ValueError(f"masked_ffn: mma=True needs fused=False and bj, bk >= 16 "
                         f"(got fused={fused}, bj={bj}, bk={bk})")
    d_ff, d_out = w_down.shape
    b_pad = max(16, next_pow2(batch)) if mma else next_pow2(batch)
    w_up_t = pad_to(pad_to(w_up_t, 1, bk), 0, bj)
    w_down = pad_to(pad_to(w_down, 1, bn), 0, bj)
    x_up = jnp.pad(x_up, ((0, b_pad - batch), (0, max(0, x_offset + w_up_t.shape[1] - x_up.shape[1]))))
    if mma:      # the kernel reads the whole (b_pad, bj) block: rows past the batch must be zeros
        act = act[:batch]
    act = jnp.pad(act.astype(jnp.float32), ((0, b_pad - batch), (0, w_up_t.shape[0] - d_ff)))
    atomic = not interpret
    programs = w_up_t.shape[0] // bj
    if (theta is None) != (activation is None):
        raise ValueError("masked_ffn: theta and activation go together")
    extra = [] if theta is None else [jnp.pad(theta.reshape(-1).astype(jnp.float32), (0, b_pad - batch))]
    params = {} if interpret else dict(compiler_params=compiler_params(num_warps, num_stages))
    if fused:
        kernel = functools.partial(_fused_kernel, bj=bj, bk=bk, bn=bn, batch=batch, atomic=atomic,
                                   unroll=unroll, partials=partials, activation=activation,
                                   x_offset=x_offset)
        args = [x_up, act, w_up_t, w_down, *extra]
        if partials:     # every program writes its own row for every live token and column
            out = jax.ShapeDtypeStruct((programs, b_pad, w_down.shape[1]), jnp.float32)
            aliases = {}
            if poison:
                aliases = backends.poison_output(args, out)
            y = pl.pallas_call(kernel, grid=(programs,), out_shape=out, input_output_aliases=aliases,
                               interpret=interpret, **params)(*args)
            return jnp.sum(y[:, :batch], axis=0)[:, :d_out]
        y0 = jnp.zeros((b_pad, w_down.shape[1]), jnp.float32)      # added into: starts at zero
        y = pl.pallas_call(kernel, grid=(programs,), out_shape=jax.ShapeDtypeStruct(y0.shape, y0.dtype),
                           input_output_aliases={len(args): 0}, interpret=interpret, **params)(*args, y0)
        return y[:batch, :d_out]
    h_shape = jax.ShapeDtypeStruct((b_pad, w_up_t.shape[0]), w_down.dtype)
    args, aliases = [x_up, act, w_up_t, *extra], {}
    if poison:   # tests: every entry of h must be written over the NaNs
        aliases = backends.poison_output(args, h_shape)
    if mma:
        kernel = functools.partial(_up_kernel_mma, bj=bj, bk=bk, atomic=atomic, unroll=unroll,
                                   activation=activation, x_offset=x_offset)
    else:
        kernel = functools.partial(_up_kernel_masked, bj=bj, bk=bk, batch=batch, atomic=atomic,
                                   unroll=unroll, activation=activation, x_offset=x_offset)
    h = pl.pallas_call(kernel, grid=(programs,), out_shape=h_shape, input_output_aliases=aliases,
                       interpret=interpret, **params)(*args)
    tiles = {"impl": "masked", **({"mma": True} if mma else {}), **(down_tiles or {})}
    if tiles.get("mma") and tiles["impl"] in ("masked", "gather"):
        # h's zero rows past the batch are the 16-row operand the tensor cores take: passed
        # whole, with no slice of its first rows and no padding of them (two launches)
        return sig.sparse_input_gemv(h, w_down, interpret=interpret, out_dtype=jnp.float32,
                                     **tiles)[:batch, :d_out]
    y = sig.sparse_input_gemv(h[:batch], w_down, interpret=interpret, out_dtype=jnp.float32, **tiles)
    return y[:, :d_out]


def pad_decode_weights(weights: DecodeWeights, *, bk: int = 128, bn: int = 128) -> DecodeWeights:
    """Zero-pads ``w_up_t``'s columns to ``bk`` and ``w_down``'s to ``bn`` once, so the
    Pallas path copies no weights per call. :func:`topk_ffn_decode` slices its
    output back to ``x``'s width."""
    return DecodeWeights(weights.w_gate, pad_to(weights.w_up_t, 1, bk), pad_to(weights.w_down, 1, bn),
                         weights.split)


# --------------------------------------------------------------------------- the layer


def topk_ffn_decode(x: jax.Array, weights: DecodeWeights, *, k: Any = None, k_frac: Any = None,
                    capacity: int | None = None, activation: Callable = jax.nn.gelu,
                    impl: str = "xla", backend: str | None = None, interpret: bool = False,
                    **tiling) -> jax.Array:
    """One decode step of a statistically top-k sparse gated FFN.

    ``y = (act(soft_topk(x_g @ W_g)) * (x_u @ W_u)) @ W_d`` computed for the
    union of the selected neurons only (see the module doc).

    Args:
      x: ``(B, d_model)``, ``1 <= B <= MAX_BATCH`` for the Pallas paths.
      weights: :class:`DecodeWeights` (possibly padded by :func:`pad_decode_weights`).
      k, k_frac: neurons kept per token.
      capacity: ``"xla"``/``"pallas"`` only: length of the active-neuron list
        (union over the batch); beyond it the layer computes every neuron (same
        answer, dense cost). The masked paths need none.
      activation: Spark uses GELU on the soft top-k output.
      impl: ``"xla"``, ``"pallas"``, ``"sparse"``, ``"fused"``, ``"reference"`` (see the
        module doc), ``"dense"`` (the selection, then every neuron in XLA: the same
        function at dense cost), or ``"auto"``: :func:`choose_impl` at this batch, so a
        layer whose sparse paths lose runs ``"dense"`` (never slower than it).
      backend: where the Pallas paths run (:func:`supported`; see
        :mod:`sparsejax.kernels.backends`): a Pallas ``impl`` that cannot run there is a
        ValueError naming why.
      interpret, tiling: see :func:`gathered_ffn` and :func:`masked_ffn`; the masked paths
        also take ``act_in_kernel=True`` (the soft top-k and activation inside the kernel
        that reads the up rows);
        the masked paths take ``gate_tiles`` (a dict of
        :func:`~sparsejax.kernels.sparse_input_gemv.sparse_input_gemv` tiles: the
        predictor GEMV on that kernel instead of XLA) or ``gate_pad2=True`` (at batch 1,
        the predictor on XLA with the row padded to two: a GEMM, where XLA's one-row
        product is a reduction that streams a short, wide gate slowly), and
        ``select_kernel=True`` (the soft top-k and activation in one launch of
        :func:`sparsejax.kernels.statistical_topk.statistical_topk_pallas`, its
        ``programs_per_row`` given by ``select_programs``; XLA's where it does not apply);
        with ``mma=True``, ``pad_batch=True`` pads the tokens to 16 rows once, before the
        predictor, instead of the kernels' inputs separately.

    Returns:
      ``(B, d_model)`` in ``x``'s dtype.
    """
    d_model = x.shape[-1]
    if impl == "auto":      # the whole layer's fastest path at this batch, dense included
        batch = int(np.prod(x.shape[:-1]))
        name = choose_impl(batch, weights, k=k, k_frac=k_frac, activation=activation,
                           dtype=x.dtype, backend=backend, interpret=interpret).name
        impl, tiling = CHOICE_PATHS.get(name, (name, {}))
        tiling = dict(tiling)
    if impl in _KERNEL_IMPLS and backends.resolve(
            backend, interpret, kernels=_KERNELS, interpreted=backends.TRITON,
            where="topk_ffn_decode") != backends.TRITON:
        raise ValueError(f"topk_ffn_decode: impl={impl!r} cannot run here "
                         f"({supported(1, backend=backend, interpret=interpret)}); use impl='xla', "
                         "'dense' or 'auto', or interpret=True on CPU")
    rows = x.shape[0]
    if (tiling.pop("pad_batch", False) and impl in _MASKED_IMPLS and tiling.get("mma")
            and 1 < rows < sig.MAX_MMA_BATCH):
        # One pad of the tokens to the tensor cores' 16 rows, shared by the predictor, the
        # selection and the up kernel (masked_ffn then pads neither x nor act: one launch
        # where there were two). The zero rows fire no neuron and give zero outputs.
        x = jnp.pad(x, ((0, sig.MAX_MMA_BATCH - rows), (0, 0)))
    gate_tiles = tiling.pop("gate_tiles", None)
    gate_pad2 = tiling.pop("gate_pad2", False)
    if gate_tiles is not None and impl in _MASKED_IMPLS:
        # The predictor GEMV on the streaming kernel (every input live): XLA's batch-1
        # GEMV for a short, wide (r, d_ff) gate ran at ~1.2 TB/s in the first H200 sweep.
        pre_rows = pre = sig.sparse_input_gemv(weights.gate_input(x), weights.w_gate, impl="masked",
                                               interpret=interpret, out_dtype=jnp.float32, **gate_tiles)
    elif gate_pad2 and x.shape[0] == 1:
        # pre_rows: the product as computed (here with its padding row), pre: x's rows of it
        pre_rows = jnp.dot(jnp.pad(weights.gate_input(x), ((0, 1), (0, 0))), weights.w_gate,
                           preferred_element_type=jnp.float32)
        pre = pre_rows[:1]
    else:
        pre_rows = pre = jnp.dot(weights.gate_input(x), weights.w_gate, preferred_element_type=jnp.float32)
    x_up = weights.up_input(x)
    # The masked kernels read the up input from the whole token (no copy of a slice of it).
    x_offset = 0 if weights.split is None else weights.split
    if impl in _MASKED_IMPLS and tiling.pop("act_in_kernel", False):
        theta = statistical_threshold(pre, k=k, k_frac=k_frac, axis=-1)
        y = masked_ffn(x, pre, weights.w_up_t, weights.w_down, fused=impl == "fused", theta=theta,
                       activation=activation, x_offset=x_offset, interpret=interpret, **tiling)
        return y[:rows, :d_model].astype(x.dtype)
    select_kernel = tiling.pop("select_kernel", False)
    select_programs = tiling.pop("select_programs", None)
    if impl in _MASKED_IMPLS and select_kernel and stk.supported(
            pre, k=k, k_frac=k_frac, activation=activation, interpret=interpret) is None:
        # The soft top-k and activation in one kernel launch (XLA: two reductions and two
        # elementwise fusions, 5.4 of 29.5 µs of kernels at batch 1 on the H200). It takes
        # the padded-row product whole: its first row as an operand would be a copy (a
        # launch). The padding row (zeros) keeps nothing, and the masked kernels read the
        # first ``batch`` rows of ``act`` only.
        act = stk.statistical_topk_pallas(pre_rows, k=k, k_frac=k_frac, activation=activation,
                                          programs_per_row=select_programs, interpret=interpret)
        y = masked_ffn(x, act, weights.w_up_t, weights.w_down, fused=impl == "fused",
                       x_offset=x_offset, interpret=interpret, **tiling)
        return y[:rows, :d_model].astype(x.dtype)
    if impl in _MASKED_IMPLS or impl == "dense":
        theta = statistical_threshold(pre, k=k, k_frac=k_frac, axis=-1)
        act = jnp.where(pre > theta, activation(pre - theta), 0.0)
        if impl == "dense":
            y = gathered_ffn_reference(x_up, act, weights.w_up_t[:, :x_up.shape[-1]], weights.w_down)
        else:
            y = masked_ffn(x, act, weights.w_up_t, weights.w_down, fused=impl == "fused",
                           x_offset=x_offset, interpret=interpret, **tiling)
        return y[:rows, :d_model].astype(x.dtype)
    if capacity is None:
        raise ValueError(f"topk_ffn_decode: impl={impl!r} needs capacity (the index-list length)")
    act, idx, count = select_neurons(pre, k=k, k_frac=k_frac, capacity=capacity, activation=activation)
    y = gathered_ffn(x_up, act, weights.w_up_t, weights.w_down, idx, count, impl=impl,
                     interpret=interpret, **tiling)
    return y[:rows, :d_model].astype(x.dtype)


# choose_impl's candidates beyond the plain impl names: (impl, tiling). "sparse_split_gate":
# the predictor GEMV and the down projection on the split-K streaming kernel (partial sums);
# "sparse_rows_down": the down projection on the sparse-input GEMV whose programs loop over
# the live rows only (its time follows the fired neurons), the predictor as "sparse_split_gate";
# "sparse_rows_down_act": that with the soft top-k and activation formed in the up kernel (the
# H200 profile of "sparse_rows_down" at batch 1: XLA's subtract and select, 2.4 of 31.8 µs);
# "sparse_rows_down_pad2_gate": "sparse_rows_down" with the predictor on XLA's padded-row GEMM
# (the same profile: the split-K predictor 11.3 µs for 28.3 MB, and its partial sums 1.6 µs);
# "..._select": that with the soft top-k and activation in one kernel (select_kernel=True);
# "sparse_mma_select": the selection kernel, then both gathered products on the tensor cores
# (mma=True: a batch of several tokens as one (16, bk) operand; not at batch 1).
_SPLIT = dict(bk=64, bn=256, steps=4, partials=True)
_ROWS = dict(impl="rows", bc=16, span=128, col_splits=8, partials=True)
# The tensor-core down projection: 8 row tiles per program into partial sums, 3 stages (the
# H200 sweep at batch 4 / 8, d_ff 13824: 47.5 / 47.2 µs for the layer against 68.1 / 72.1
# with one-tile programs adding into y by atomics).
_MMA_DOWN = dict(bk=64, bn=256, steps=8, partials=True, num_stages=3)
CHOICE_PATHS = {"sparse_split_gate": ("sparse", dict(down_tiles=_SPLIT, gate_tiles=_SPLIT)),
                "sparse_rows_down": ("sparse", dict(down_tiles=_ROWS, gate_tiles=_SPLIT)),
                "sparse_rows_down_pad2_gate": ("sparse", dict(down_tiles=_ROWS, gate_pad2=True)),
                "sparse_rows_down_pad2_gate_select": ("sparse", dict(down_tiles=_ROWS, gate_pad2=True,
                                                                     select_kernel=True)),
                "sparse_rows_down_act": ("sparse", dict(down_tiles=_ROWS, gate_tiles=_SPLIT,
                                                        act_in_kernel=True)),
                "sparse_mma_select": ("sparse", dict(mma=True, select_kernel=True, down_tiles=_MMA_DOWN)),
                # the tokens padded to 16 rows once, before the predictor (one pad launch fewer)
                "sparse_mma_select_padded": ("sparse", dict(mma=True, select_kernel=True, pad_batch=True,
                                                            down_tiles=_MMA_DOWN))}


def choose_impl(batch: int, weights: DecodeWeights, *, k: Any = None, k_frac: Any = None,
                activation: Callable = jax.nn.gelu, dtype=jnp.bfloat16,
                candidates: tuple[str, ...] = ("fused", "sparse", "sparse_split_gate",
                                               "sparse_rows_down", "sparse_rows_down_act",
                                               "sparse_rows_down_pad2_gate",
                                               "sparse_rows_down_pad2_gate_select",
                                               "sparse_mma_select", "sparse_mma_select_padded",
                                               "dense"),
                backend: str | None = None, interpret: bool = False) -> path_choice.Choice:
    """The fastest correct decode path at this batch size, by measurement on the device.

    The union of fired neurons grows with the batch (``1 - (1 - k/d_ff)^B`` of
    them for independent tokens), so a masked path that wins at batch 1 can lose
    to the dense product at batch 8. Candidates run the whole layer on random
    inputs (random tokens fire random neurons, like real ones at the same ``k``),
    with the weights streamed from memory as in a model (several copies, beyond the
    L2); on the CPU the choice is deterministic (dense: no kernel runs there).
    """
    on_gpu = supported(1, backend=backend, interpret=interpret) is None
    cands = []
    for name in candidates:
        why = None if name == "dense" else supported(batch, backend=backend, interpret=interpret)
        impl, tiling = CHOICE_PATHS.get(name, (name, {}))
        if why is None and batch == 1 and tiling.get("mma"):
            why = "batch 1: the tensor-core path would pad one token to 16 rows"
        fn = functools.partial(_layer_fn, impl=impl, k=k, k_frac=k_frac, activation=activation,
                               split=weights.split, tiling=tiling, backend=backend,
                               interpret=interpret)
        cands.append(path_choice.Candidate(name, fn, why, describe=f"Spark FFN decode ({name})"))
    cands.sort(key=lambda c: c.name == "dense")      # kernels first on a GPU, dense the fallback
    if not on_gpu:
        cands.sort(key=lambda c: c.name != "dense")
    specs = [jax.ShapeDtypeStruct((batch, weights.d_model), dtype),
             *(jax.ShapeDtypeStruct(w.shape, dtype) for w in (weights.w_gate, weights.w_up_t,
                                                             weights.w_down))]
    signature = (f"B{batch}|gate{tuple(weights.w_gate.shape)}|up{tuple(weights.w_up_t.shape)}|"
                 f"down{tuple(weights.w_down.shape)}|k{k}|kf{k_frac}|{jnp.dtype(dtype).name}")
    return streaming_choice.choose_streaming("spark_ffn_decode", signature, cands, specs,
                                             weight_args=(1, 2, 3), baseline="dense")


def _layer_fn(x, w_gate, w_up_t, w_down, *, impl, k, k_frac, activation, split, tiling=None,
              backend=None, interpret=False):
    w = DecodeWeights(w_gate, w_up_t, w_down, split)
    return topk_ffn_decode(x, w, k=k, k_frac=k_frac, activation=activation, impl=impl,
                           backend=backend, interpret=interpret, **dict(tiling or {}))


def topk_ffn_decode_reference(x: jax.Array, weights: DecodeWeights, *, k: Any = None,
                              k_frac: Any = None, activation: Callable = jax.nn.gelu) -> jax.Array:
    """Dense plain-JAX twin of :func:`topk_ffn_decode` (every neuron, no index list)."""
    d_model = x.shape[-1]
    resolve_k_frac(weights.d_ff, k, k_frac, "topk_ffn_decode_reference")
    pre = jnp.dot(weights.gate_input(x), weights.w_gate, preferred_element_type=jnp.float32)
    theta = statistical_threshold(pre, k=k, k_frac=k_frac)
    act = jnp.where(pre > theta, activation(pre - theta), 0.0)
    x_up = weights.up_input(x)
    y = gathered_ffn_reference(x_up, act, weights.w_up_t[:, :x_up.shape[-1]], weights.w_down[:, :d_model])
    return y.astype(x.dtype)
