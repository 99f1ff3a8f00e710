"""Flax Linen layers with Monarch and block-diagonal weights.

Drop-in replacements for ``nn.Dense(features)`` whose weight is factorized as in
:mod:`sparsejax.monarch` (fly's ``MonarchLinear`` / ``BlockdiagLinear`` layout),
so a model can be written with them directly instead of being rewritten by the
compiler pass. Parameters: ``w1``, ``w2`` (Monarch) or ``w`` (block-diagonal),
and ``bias``; their initial output variance matches ``nn.Dense``'s default
(LeCun normal).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax import monarch
from sparsejax.kernels import monarch_matmul as kernels

__all__ = ["MonarchDense", "BlockDiagonalDense"]


class MonarchDense(nn.Module):
    """``y = x @ W + b`` with ``W`` a Monarch matrix of ``nblocks`` blocks.

    Attributes:
      features: output size ``N``.
      nblocks: blocks per factor; ``1 <= nblocks <= min(K, N)``.
      use_bias: add a bias.
      dtype: computation dtype (``None``: promote inputs and params).
      param_dtype: parameter dtype.
      use_kernel: multiply through ``kernels.monarch_matmul.monarch_matmul`` (on GPU
        the einsum path with a bf16 backward; the plain-JAX reference elsewhere).
    """

    features: int
    nblocks: int = 4
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_kernel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = x.shape[-1]
        shape1, shape2 = monarch.monarch_shapes(k, self.features, self.nblocks, name=self.name or "MonarchDense")

        def init(part):
            def fn(key, shape, dtype):
                return monarch.init_factors(key, k, self.features, self.nblocks, dtype)[part]
            return fn

        factors = {"w1": self.param("w1", init("w1"), shape1, self.param_dtype),
                   "w2": self.param("w2", init("w2"), shape2, self.param_dtype)}
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) \
            if self.use_bias else None
        x, factors["w1"], factors["w2"], bias = nn.dtypes.promote_dtype(
            x, factors["w1"], factors["w2"], bias, dtype=self.dtype)
        if self.use_kernel:
            y = kernels.monarch_matmul(x, factors, self.features)
        else:
            y = monarch.matmul_reference(x, factors, self.features)
        return y + bias if bias is not None else y


class BlockDiagonalDense(nn.Module):
    """``y = x @ W + b`` with ``W`` block-diagonal of ``nblocks`` blocks."""

    features: int
    nblocks: int = 4
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = x.shape[-1]
        shape = monarch.blockdiag_shape(k, self.features, self.nblocks, name=self.name or "BlockDiagonalDense")

        def init(key, shape, dtype):
            return monarch.blockdiag_init(key, k, self.features, self.nblocks, dtype)["w"]

        w = self.param("w", init, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) \
            if self.use_bias else None
        x, w, bias = nn.dtypes.promote_dtype(x, w, bias, dtype=self.dtype)
        y = monarch.blockdiag_matmul_reference(x, {"w": w}, self.features)
        return y + bias if bias is not None else y
