"""Monarch and block-diagonal factorizations of a weight matrix, free of any jaxpr.

Conventions. Every function here speaks the *matrix view* of
:mod:`sparsejax.layout`: a dense weight ``W`` of shape ``(K, N)`` acts as
``y = x @ W`` (``K`` inputs, ``N`` outputs). The factors themselves are stored as
fly's ``MonarchLinear(nblocks=k)`` stores them (Dao et al., "Monarch: Expressive
Structured Matrices for Efficient and Accurate Training", ICML 2022), so weights
move between the two code bases unchanged:

* the input is zero-padded to ``K_ext = p * nblocks`` with ``p = ceil(K / nblocks)``,
  the output is computed at ``N_ext = s * nblocks`` with ``s = ceil(N / nblocks)``
  and sliced back to ``N``;
* ``w1`` has shape ``(nblocks, q, p)`` and ``w2`` shape ``(nblocks, s, q)``, each
  block stored ``(out, in)`` like a torch ``Linear``; ``q = p`` when
  ``K_ext < N_ext`` and ``q = s`` otherwise (the intermediate has the smaller
  width ``nblocks * q``);
* the multiply is ``h[:, i, :] = x[:, i, :] @ w1[i].T`` over contiguous input
  blocks; ``h`` is flattened, read as ``(q, nblocks)`` and transposed (the
  permutation: block ``j`` of the second factor sees every ``nblocks``-th entry
  of ``h``, starting at ``j``); ``z[:, j, :] = h_j @ w2[j].T``; the output index
  is ``s_index * nblocks + j`` (a second, fixed permutation).

Factors are a dict of arrays, ``{"w1": ..., "w2": ...}`` for Monarch and
``{"w": ...}`` (shape ``(nblocks, s, p)``) for block-diagonal; the sizes that
padding hides (``K``, ``N``) are passed where a function needs them. Everything is
a pure function of arrays and composes with ``jit``, ``grad`` and ``vmap``
(stacked layers: ``jax.vmap`` over a leading axis; :func:`project`,
:func:`to_dense` and :func:`init_factors` also take leading stack axes
directly).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_nblocks",
    "monarch_shapes",
    "blockdiag_shape",
    "init_factors",
    "matmul_reference",
    "to_dense",
    "project",
    "blockdiag_init",
    "blockdiag_matmul_reference",
    "blockdiag_to_dense",
    "blockdiag_project",
    "param_count",
    "blockdiag_param_count",
    "flops",
    "dense_flops",
    "pad_features",
]

Factors = dict[str, jax.Array]


# --------------------------------------------------------------------------- shapes


def check_nblocks(k: int, n: int, nblocks: Any, name: str = "weight") -> int:
    """Validates ``nblocks`` for a ``(k, n)`` weight; returns it as an int.

    Raises ValueError unless ``1 <= nblocks <= min(k, n)``: more blocks than rows
    or columns would leave whole blocks made only of padding.
    """
    if isinstance(nblocks, bool) or not isinstance(nblocks, (int, np.integer)):
        raise TypeError(f"{name}: nblocks must be an int, got {nblocks!r}")
    if k < 1 or n < 1:
        raise ValueError(f"{name}: weight matrix must be non-empty, got shape ({k}, {n})")
    if not 1 <= nblocks <= min(k, n):
        raise ValueError(
            f"{name}: nblocks must satisfy 1 <= nblocks <= min(K, N) = {min(k, n)} "
            f"for a ({k}, {n}) weight, got nblocks={nblocks}")
    return int(nblocks)


def pad_features(size: int, nblocks: int) -> tuple[int, int]:
    """``(block size, padded size)`` for ``size`` features split into ``nblocks`` blocks."""
    block = -(-size // nblocks)
    return block, block * nblocks


def monarch_shapes(k: int, n: int, nblocks: int, name: str = "weight"
                   ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes of ``w1`` and ``w2`` for a ``(k, n)`` weight (fly's ``MonarchLinear``)."""
    nblocks = check_nblocks(k, n, nblocks, name)
    p, k_ext = pad_features(k, nblocks)
    s, n_ext = pad_features(n, nblocks)
    q = p if k_ext < n_ext else s
    return (nblocks, q, p), (nblocks, s, q)


def blockdiag_shape(k: int, n: int, nblocks: int, name: str = "weight") -> tuple[int, int, int]:
    """Shape of the block-diagonal factor ``w`` for a ``(k, n)`` weight."""
    nblocks = check_nblocks(k, n, nblocks, name)
    return (nblocks, pad_features(n, nblocks)[0], pad_features(k, nblocks)[0])


def _check_factors(factors: Factors, name: str) -> tuple[jax.Array, jax.Array]:
    if not isinstance(factors, dict) or set(factors) != {"w1", "w2"}:
        raise TypeError(f"{name}: Monarch factors must be a dict with keys 'w1' and 'w2', "
                        f"got {type(factors).__name__} {list(factors) if isinstance(factors, dict) else ''}")
    w1, w2 = factors["w1"], factors["w2"]
    if w1.ndim != 3 or w2.ndim != 3:
        raise ValueError(f"{name}: w1 and w2 must be 3-D (nblocks, out, in); got shapes "
                         f"{w1.shape} and {w2.shape} (vmap over stacked layers)")
    nb, q, _ = w1.shape
    if w2.shape[0] != nb or w2.shape[2] != q:
        raise ValueError(f"{name}: w2 shape {w2.shape} does not chain with w1 shape {w1.shape}: "
                         f"need (nblocks={nb}, s, q={q})")
    return w1, w2


# --------------------------------------------------------------------------- multiply


def _dot(a, b, spec, precision, dtype):
    out = jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(dtype)


def matmul_reference(x: jax.Array, factors: Factors, out_features: int | None = None, *,
                     precision=None, name: str = "weight") -> jax.Array:
    """``x @ W`` for the Monarch matrix ``W`` the factors define, in plain JAX.

    Args:
      x: ``(..., K)`` inputs; ``K <= nblocks * p`` (shorter inputs are zero-padded).
      factors: ``{"w1": (nblocks, q, p), "w2": (nblocks, s, q)}``.
      out_features: ``N``; the output is sliced to it (default ``nblocks * s``).
      precision: passed to the einsums (``lax.Precision.HIGHEST`` for exact f32 on GPU).

    Returns:
      ``(..., N)``, in the promoted dtype of ``x`` and the factors; products
      accumulate in float32 and the intermediate is rounded to that dtype, as the
      fused kernel does.
    """
    w1, w2 = _check_factors(factors, name)
    nb, q, p = w1.shape
    s = w2.shape[1]
    k_ext, n_ext = nb * p, nb * s
    if x.shape[-1] > k_ext:
        raise ValueError(f"{name}: input has {x.shape[-1]} features, the factors take at most {k_ext}")
    out_features = n_ext if out_features is None else out_features
    if not 1 <= out_features <= n_ext:
        raise ValueError(f"{name}: out_features must be in [1, {n_ext}], got {out_features}")
    dtype = jnp.result_type(x.dtype, w1.dtype, w2.dtype)
    batch = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    x = jnp.pad(x, ((0, 0), (0, k_ext - x.shape[-1]))).reshape(-1, nb, p)
    h = _dot(x, w1, "tip,iqp->tiq", precision, dtype)
    # The permutation: flatten (nblocks, q), read it as (q, nblocks), transpose.
    h = h.reshape(-1, q, nb).transpose(0, 2, 1)
    z = _dot(h, w2, "tjq,jsq->tsj", precision, dtype)
    return z.reshape(*batch, n_ext)[..., :out_features]


def to_dense(factors: Factors, in_features: int | None = None,
             out_features: int | None = None) -> jax.Array:
    """The ``(K, N)`` dense matrix of the factors (the paper's sparse-to-dense step).

    ``x @ to_dense(f, K, N)`` equals :func:`matmul_reference` up to float rounding.
    Leading stack axes on the factors are kept.
    """
    if factors["w1"].ndim > 3:
        return jax.vmap(lambda f: to_dense(f, in_features, out_features))(factors)
    w1, w2 = _check_factors(factors, "to_dense")
    k = in_features if in_features is not None else w1.shape[0] * w1.shape[2]
    return _to_dense(factors, k, out_features)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _to_dense(factors: Factors, k: int, out_features: int | None) -> jax.Array:
    w1, w2 = factors["w1"], factors["w2"]
    nb, q, p = w1.shape
    s = w2.shape[1]
    dtype = jnp.result_type(w1.dtype, w2.dtype)
    if q % nb:
        # No block structure to the permutation: push the identity through the product.
        eye = jnp.eye(k, dtype=dtype)
        return matmul_reference(eye, factors, out_features, precision=jax.lax.Precision.HIGHEST)
    # Entry (i*p + c_in, s'*nb + j) sums the q/nb paths through the intermediate: h index
    # c = c1*nb + j of input block i is read by output block j at r = i*q/nb + c1. One
    # batched product over the nb*nb block pairs, each (p, q/nb) @ (q/nb, s): q/nb
    # multiply-adds per entry, where the identity pushed through the factors costs
    # K*(nb*q*p + nb*s*q) and its gradient as much again. Float32 factors multiply exactly
    # (HIGHEST); others in their own dtype, so a bf16 site rebuilds its weight with bf16
    # GEMMs, its backward too.
    c1 = q // nb
    a = w1.reshape(nb, c1, nb, p)               # [i, c1, j, c_in]
    b = w2.reshape(nb, s, nb, c1)               # [j, s', i, c1]
    if dtype == jnp.float32:
        w4 = jnp.einsum("icjp,jsic->ipsj", a, b, precision=jax.lax.Precision.HIGHEST)
    else:
        # A result in the factors' dtype (the GEMM still accumulates in float32), so the
        # cotangent arriving at the backward products is that dtype too, not float32.
        w4 = jnp.einsum("icjp,jsic->ipsj", a.astype(dtype), b.astype(dtype),
                        preferred_element_type=dtype)
    n = nb * s if out_features is None else out_features
    return w4.reshape(nb * p, s * nb)[:k, :n]


# --------------------------------------------------------------------------- projection


def _check_finite(w: jax.Array, name: str) -> None:
    if isinstance(w, jax.core.Tracer):
        return  # under jit the caller checks before tracing; nothing concrete to look at
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"{name}: cannot project a weight with NaN or Inf entries")


def _check_matrix(w: jax.Array, name: str, min_ndim: int = 2) -> None:
    if not hasattr(w, "ndim") or w.ndim < min_ndim:
        raise ValueError(f"{name}: expected a (..., K, N) weight matrix, got shape "
                         f"{getattr(w, 'shape', type(w).__name__)}")


def _padded_torch_view(w_kn: jax.Array, nb: int) -> tuple[jax.Array, int, int]:
    """``W`` (K, N) -> zero-padded ``M = W.T`` of shape ``(N_ext, K_ext)``."""
    k, n = w_kn.shape
    p, k_ext = pad_features(k, nb)
    s, n_ext = pad_features(n, nb)
    m = jnp.pad(w_kn.T, ((0, n_ext - n), (0, k_ext - k)))
    return m, p, s


def _monarch_index_plan(nb: int, q: int) -> tuple[np.ndarray, ...]:
    """For every intermediate index ``t = i * q + c``: which sub-block and which rank slot.

    Entry ``t`` of ``h`` is produced by row ``c`` of ``w1[i]`` and consumed by
    column ``r = t // nb`` of ``w2[j]``, ``j = t % nb``; it is one rank-one term of
    the ``(j, i)`` sub-block of ``W.T``. ``slot`` numbers the terms of a sub-block.
    """
    t = np.arange(nb * q)
    i, c = t // q, t % q
    j, r = t % nb, t // nb
    slot = np.zeros_like(t)
    seen: dict[tuple[int, int], int] = {}
    for idx in range(t.size):
        key = (int(j[idx]), int(i[idx]))
        slot[idx] = seen.get(key, 0)
        seen[key] = slot[idx] + 1
    return i, c, j, r, slot


def _per_stacked_matrix(single, w_kn: jax.Array, nblocks: int, name: str) -> Factors:
    """``single(w, nblocks)`` for each ``(K, N)`` matrix of a stacked ``(..., K, N)`` weight."""
    k, n = w_kn.shape[-2:]
    check_nblocks(k, n, nblocks, name)
    out = jax.vmap(lambda w: single(w, nblocks, name=name))(w_kn.reshape(-1, k, n))
    return jax.tree.map(lambda a: a.reshape(*w_kn.shape[:-2], *a.shape[1:]), out)


def project(w_kn: jax.Array, nblocks: int, *, name: str = "weight") -> Factors:
    """The Monarch factors closest to ``W`` in Frobenius norm (dense -> Monarch).

    Each ``(out-block j, in-block i)`` sub-matrix of ``W.T`` (out-block ``j`` being
    the output rows ``j, j + nblocks, ...``) depends only on its
    own slice of ``w1[i]`` and ``w2[j]`` and is a product of rank ``q / nblocks``
    (when ``nblocks`` divides ``q``), so a truncated SVD per sub-matrix is the
    exact optimum (Eckart-Young). When ``nblocks`` does not divide ``K`` or ``N``
    the zero-padded matrix is projected; entries that padding adds are ignored by
    the multiply.

    Args:
      w_kn: ``(..., K, N)``; leading axes are stacked layers.
      nblocks: number of blocks.
      name: the parameter path, for error messages.
    """
    _check_matrix(w_kn, name)
    _check_finite(w_kn, name)
    if w_kn.ndim > 2:
        return _per_stacked_matrix(project, w_kn, nblocks, name)
    k, n = w_kn.shape
    monarch_shapes(k, n, nblocks, name)
    return _project_matrix(w_kn, int(nblocks))


@functools.partial(jax.jit, static_argnums=1)
def _project_matrix(w_kn: jax.Array, nb: int) -> Factors:
    k, n = w_kn.shape
    (_, q, p), (_, s, _) = monarch_shapes(k, n, nb)
    m, _, _ = _padded_torch_view(w_kn.astype(jnp.float32), nb)
    # Output row o = s_index * nblocks + j belongs to out-block j (rows strided by
    # nblocks); input column i * p + p_index to in-block i (contiguous).
    blocks = m.reshape(s, nb, nb, p).transpose(1, 2, 0, 3)        # (j, i, s, p)
    u, sv, vt = jnp.linalg.svd(blocks, full_matrices=False)   # (nb, nb, s, r), (.., r), (.., r, p)
    rank = sv.shape[-1]
    i, c, j, r, slot = _monarch_index_plan(nb, q)
    # A sub-block may ask for more terms than its rank; those terms are zero.
    valid = jnp.asarray(slot < rank, jnp.float32)
    slot_c = np.minimum(slot, rank - 1)
    root = jnp.sqrt(sv[j, i, slot_c]) * valid                      # (nb*q,)
    w1_rows = vt[j, i, slot_c, :] * root[:, None]                  # (nb*q, p)
    w2_cols = u[j, i, :, slot_c] * root[:, None]                   # (nb*q, s)
    w1 = jnp.zeros((nb, q, p), jnp.float32).at[i, c].set(w1_rows)
    w2 = jnp.zeros((nb, s, q), jnp.float32).at[j, :, r].set(w2_cols)
    return {"w1": w1.astype(w_kn.dtype), "w2": w2.astype(w_kn.dtype)}


# --------------------------------------------------------------------------- init


def init_factors(key: jax.Array, k: int, n: int, nblocks: int, dtype=jnp.float32, *,
                 dense_std: float | None = None, stack_shape: Sequence[int] = (),
                 name: str = "weight") -> Factors:
    """Random Monarch factors whose outputs have a dense layer's variance.

    A dense ``(K, N)`` layer with i.i.d. ``N(0, dense_std**2)`` weights maps
    unit-variance inputs to outputs of variance ``K * dense_std**2`` (``1`` for
    the default LeCun ``dense_std = 1 / sqrt(K)``). Here ``w1`` has variance
    ``K_ext / (K * p)`` (each intermediate sums ``p`` inputs of which ``K / K_ext``
    are real) and ``w2`` variance ``K * dense_std**2 / q`` (each output sums ``q``
    intermediates), which gives the same output variance.
    """
    (nb, q, p), w2_shape = monarch_shapes(k, n, nblocks, name)
    dense_var = 1.0 / k if dense_std is None else float(dense_std) ** 2
    k1, k2 = jax.random.split(key)
    std1 = math.sqrt(nb * p / (k * p))
    std2 = math.sqrt(k * dense_var / q)
    stack = tuple(stack_shape)
    return {
        "w1": (std1 * jax.random.normal(k1, (*stack, nb, q, p), jnp.float32)).astype(dtype),
        "w2": (std2 * jax.random.normal(k2, (*stack, *w2_shape), jnp.float32)).astype(dtype),
    }


# --------------------------------------------------------------------------- block-diagonal


def _check_blockdiag(factors: Factors, name: str) -> jax.Array:
    if not isinstance(factors, dict) or set(factors) != {"w"}:
        raise TypeError(f"{name}: block-diagonal factors must be a dict with the key 'w'")
    w = factors["w"]
    if w.ndim != 3:
        raise ValueError(f"{name}: w must be 3-D (nblocks, out, in), got shape {w.shape}")
    return w


def blockdiag_matmul_reference(x: jax.Array, factors: Factors, out_features: int | None = None,
                               *, precision=None, name: str = "weight") -> jax.Array:
    """``x @ W`` for a block-diagonal ``W`` (fly's ``BlockdiagLinear``), in plain JAX."""
    w = _check_blockdiag(factors, name)
    nb, s, p = w.shape
    k_ext, n_ext = nb * p, nb * s
    if x.shape[-1] > k_ext:
        raise ValueError(f"{name}: input has {x.shape[-1]} features, the factor takes at most {k_ext}")
    out_features = n_ext if out_features is None else out_features
    if not 1 <= out_features <= n_ext:
        raise ValueError(f"{name}: out_features must be in [1, {n_ext}], got {out_features}")
    dtype = jnp.result_type(x.dtype, w.dtype)
    batch = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    x = jnp.pad(x, ((0, 0), (0, k_ext - x.shape[-1]))).reshape(-1, nb, p)
    y = _dot(x, w, "tip,isp->tis", precision, dtype)
    return y.reshape(*batch, n_ext)[..., :out_features]


def blockdiag_to_dense(factors: Factors, in_features: int | None = None,
                       out_features: int | None = None) -> jax.Array:
    """The ``(K, N)`` dense matrix of a block-diagonal factor."""
    if factors["w"].ndim > 3:
        return jax.vmap(lambda f: blockdiag_to_dense(f, in_features, out_features))(factors)
    w = _check_blockdiag(factors, "blockdiag_to_dense")
    nb, s, p = w.shape
    dense = jax.scipy.linalg.block_diag(*[w[b].T for b in range(nb)])   # (K_ext, N_ext)
    k = nb * p if in_features is None else in_features
    n = nb * s if out_features is None else out_features
    return dense[:k, :n]


def blockdiag_project(w_kn: jax.Array, nblocks: int, *, name: str = "weight") -> Factors:
    """The block-diagonal factor closest to ``W`` in Frobenius norm: its diagonal blocks."""
    _check_matrix(w_kn, name)
    _check_finite(w_kn, name)
    if w_kn.ndim > 2:
        return _per_stacked_matrix(blockdiag_project, w_kn, nblocks, name)
    k, n = w_kn.shape
    nb, s, p = blockdiag_shape(k, n, nblocks, name)
    m, _, _ = _padded_torch_view(w_kn, nb)
    blocks = m.reshape(nb, s, nb, p)
    idx = jnp.arange(nb)
    return {"w": blocks[idx, :, idx, :]}


def blockdiag_init(key: jax.Array, k: int, n: int, nblocks: int, dtype=jnp.float32, *,
                   dense_std: float | None = None, stack_shape: Sequence[int] = (),
                   name: str = "weight") -> Factors:
    """A random block-diagonal factor whose outputs have a dense layer's variance.

    Each output sums ``p`` inputs, ``K / K_ext`` of them real, so the variance is
    ``K * dense_std**2 * K_ext / (K * p)`` = ``dense_std**2 * nblocks``.
    """
    nb, s, p = blockdiag_shape(k, n, nblocks, name)
    dense_var = 1.0 / k if dense_std is None else float(dense_std) ** 2
    std = math.sqrt(dense_var * nb * p * k / (k * p)) if p else 0.0
    w = std * jax.random.normal(key, (*tuple(stack_shape), nb, s, p), jnp.float32)
    return {"w": w.astype(dtype)}


# --------------------------------------------------------------------------- cost


def param_count(k: int, n: int, nblocks: int) -> int:
    """Parameters of the Monarch factors of a ``(k, n)`` weight (padding included)."""
    s1, s2 = monarch_shapes(k, n, nblocks)
    return math.prod(s1) + math.prod(s2)


def blockdiag_param_count(k: int, n: int, nblocks: int) -> int:
    """Parameters of the block-diagonal factor of a ``(k, n)`` weight."""
    return math.prod(blockdiag_shape(k, n, nblocks))


def flops(tokens: int, k: int, n: int, nblocks: int, kind: str = "monarch") -> int:
    """Forward FLOPs (2 per multiply-add) of ``tokens`` rows through the factorized layer."""
    if kind == "monarch":
        return 2 * tokens * param_count(k, n, nblocks)
    if kind == "blockdiag":
        return 2 * tokens * blockdiag_param_count(k, n, nblocks)
    raise ValueError(f"kind must be 'monarch' or 'blockdiag', got {kind!r}")


def dense_flops(tokens: int, k: int, n: int) -> int:
    """Forward FLOPs of ``tokens`` rows through a dense ``(k, n)`` layer."""
    return 2 * tokens * k * n
