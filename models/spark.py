"""Spark Transformer layers (You et al., 2025) as Flax Linen modules.

* :class:`GatedFFN`: the dense gated FFN ``(act(x W_g) * (x W_u)) W_d``.
* :class:`SparkFFN`: statistical top-k on the gate pre-activation. With
  ``predictor_dims=r`` it is the paper's Spark FFN: one merged kernel ``wi``
  ``(d_model, d_ff)`` whose first ``r`` rows act on ``x[:r]`` as gate and
  predictor, the other rows on ``x[r:]`` as the up projection::

      y = act(topk(x[:r] @ wi[:r])) * (x[r:] @ wi[r:]) @ wo

  With ``predictor_dims=None`` it is a plain gated FFN with top-k inserted on the
  gate pre-activation (Gemma 3n style), with :class:`GatedFFN`'s parameters
  (``gate``, ``up``, ``down``), so dense weights load directly.
* :class:`SparkAttention`: per query, the top-k keys by a predictor on the first
  ``r`` dims of each head's query and key; softmax over the chosen keys times
  softplus of the score on the remaining dims::

      w = softmax(topk_-inf(q[:r] . K[:r])) * softplus(q[r:] . K[r:]),  out = w V

  With ``predictor_dims=None``: standard attention with statistical top-k on the
  scores before the softmax (what the compiler's top-k pass inserts).

Kernels follow Flax's convention (input axis first, output last), so every
weight is also a valid ``nn.Dense``/``nn.DenseGeneral`` kernel.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.topk import statistical_topk

__all__ = ["GatedFFN", "SparkFFN", "SparkAttention"]

_default_init = nn.initializers.lecun_normal()


def _dot(x, w, dtype):
    return jnp.dot(x.astype(dtype), w.astype(dtype))


class GatedFFN(nn.Module):
    """Dense gated FFN ``(act(x @ gate) * (x @ up)) @ down``.

    Attributes:
      d_ff: hidden width.
      activation: GELU (tanh approximation) by default, as Gemma.
      dtype: computation dtype (``None``: the input's).
      param_dtype: parameter dtype.
    """

    d_ff: int
    activation: Callable = nn.gelu
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = _default_init

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        dtype = self.dtype or x.dtype
        gate = self.param("gate", self.kernel_init, (d, self.d_ff), self.param_dtype)
        up = self.param("up", self.kernel_init, (d, self.d_ff), self.param_dtype)
        down = self.param("down", self.kernel_init, (self.d_ff, d), self.param_dtype)
        h = self.activation(_dot(x, gate, dtype)) * _dot(x, up, dtype)
        return _dot(h, down, dtype)


class SparkFFN(nn.Module):
    """Gated FFN whose activation is statistical top-k sparse (Spark FFN).

    Attributes:
      d_ff: hidden width (the paper widens it 1.5x over the dense model at equal
        parameters when ``predictor_dims`` is set).
      k_frac: fraction of neurons kept per token (paper: 0.08); or
      k: neurons kept per token. Exactly one of the two.
      predictor_dims: ``r``, the input dims the gate/predictor reads (paper, Gemma-2
        2B: 1024 of 2304); ``None`` for a plain gated FFN with top-k on its gate.
      activation: applied to ``max(pre - theta, 0)`` (GELU in the paper).
      stop_gradient_threshold: no gradient through the top-k threshold.
      dtype, param_dtype, kernel_init: as :class:`GatedFFN`.

    Parameters: ``wi`` ``(d_model, d_ff)`` and ``wo`` ``(d_ff, d_model)`` when
    ``predictor_dims`` is set; else ``gate``, ``up``, ``down`` as :class:`GatedFFN`.
    """

    d_ff: int
    k_frac: float | None = 0.08
    k: int | None = None
    predictor_dims: int | None = None
    activation: Callable = nn.gelu
    stop_gradient_threshold: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = _default_init

    def _topk_act(self, pre):
        k_frac = None if self.k is not None else self.k_frac
        h = statistical_topk(pre, k=self.k, k_frac=k_frac, mode="soft",
                             stop_gradient_threshold=self.stop_gradient_threshold)
        # act(0) must be 0 so dropped neurons stay dropped (GELU, ReLU, SiLU all are)
        return jnp.where(h > 0, self.activation(h), 0.0).astype(h.dtype)

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        dtype = self.dtype or x.dtype
        if self.predictor_dims is None:
            gate = self.param("gate", self.kernel_init, (d, self.d_ff), self.param_dtype)
            up = self.param("up", self.kernel_init, (d, self.d_ff), self.param_dtype)
            down = self.param("down", self.kernel_init, (self.d_ff, d), self.param_dtype)
            h = self._topk_act(_dot(x, gate, dtype)) * _dot(x, up, dtype)
            return _dot(h, down, dtype)
        r = self.predictor_dims
        if not isinstance(r, int) or not 0 < r < d:
            raise ValueError(f"SparkFFN: predictor_dims must be an int with 0 < r < d_model = {d}, got {r!r}")
        wi = self.param("wi", self.kernel_init, (d, self.d_ff), self.param_dtype)
        wo = self.param("wo", self.kernel_init, (self.d_ff, d), self.param_dtype)
        h = self._topk_act(_dot(x[..., :r], wi[:r], dtype)) * _dot(x[..., r:], wi[r:], dtype)
        return _dot(h, wo, dtype)


class SparkAttention(nn.Module):
    """Causal self-attention where each query attends to at most about ``k`` keys.

    Attributes:
      num_heads, head_dim: heads and their size.
      k: keys kept per query (paper: 256); rows with at most ``k`` visible keys
        keep them all.
      predictor_dims: ``r`` dims of each head's query and key that score keys for
        the top-k (paper: 128 of 256... set per model); ``None``: plain attention
        with statistical top-k on its scores.
      causal: mask future keys.
      dtype, param_dtype, kernel_init: as :class:`GatedFFN`.

    Parameters (``nn.MultiHeadDotProductAttention`` names and layouts):
    ``query``, ``key``, ``value`` ``(d_model, num_heads, head_dim)``, ``out``
    ``(num_heads, head_dim, d_model)``.
    """

    num_heads: int
    head_dim: int
    k: int = 256
    predictor_dims: int | None = None
    causal: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = _default_init

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        dtype = self.dtype or x.dtype
        hshape = (d, self.num_heads, self.head_dim)
        wq = self.param("query", self.kernel_init, hshape, self.param_dtype)
        wk = self.param("key", self.kernel_init, hshape, self.param_dtype)
        wv = self.param("value", self.kernel_init, hshape, self.param_dtype)
        wo = self.param("out", self.kernel_init, (self.num_heads, self.head_dim, d), self.param_dtype)
        proj = lambda w: jnp.einsum("...td,dhe->...hte", x.astype(dtype), w.astype(dtype))
        q, kk, v = proj(wq), proj(wk), proj(wv)                    # (..., H, T, hd)
        t = x.shape[-2]
        valid = jnp.tril(jnp.ones((t, t), bool)) if self.causal else jnp.ones((t, t), bool)
        r = self.predictor_dims
        if r is None:
            scores = jnp.einsum("...hqe,...hke->...hqk", q, kk) / jnp.sqrt(self.head_dim).astype(dtype)
            scores = jnp.where(valid, scores, -jnp.inf)
            kept = statistical_topk(scores, k=self.k, mode="hard", fill=-jnp.inf, where=valid)
            weights = jax.nn.softmax(kept.astype(jnp.float32), axis=-1)
        else:
            if not isinstance(r, int) or not 0 < r < self.head_dim:
                raise ValueError(f"SparkAttention: predictor_dims must be an int with 0 < r < head_dim = "
                                 f"{self.head_dim}, got {r!r}")
            pred = jnp.einsum("...hqe,...hke->...hqk", q[..., :r], kk[..., :r]) / jnp.sqrt(r).astype(dtype)
            rest = jnp.einsum("...hqe,...hke->...hqk", q[..., r:], kk[..., r:]) / jnp.sqrt(
                self.head_dim - r).astype(dtype)
            pred = jnp.where(valid, pred, -jnp.inf)
            kept = statistical_topk(pred, k=self.k, mode="hard", fill=-jnp.inf, where=valid)
            weights = jax.nn.softmax(kept.astype(jnp.float32), axis=-1) * jax.nn.softplus(
                rest.astype(jnp.float32))
        out = jnp.einsum("...hqk,...hke->...hqe", weights.astype(dtype), v)
        return jnp.einsum("...hqe,hed->...qd", out, wo.astype(dtype))
