"""Where the matrix hides in a parameter leaf.

A Flax kernel is not always a ``(K, N)`` matrix: a scanned Dense kernel is
``(layers, K, N)``, a DenseGeneral attention kernel is ``(d, heads, head_dim)``, a
conv kernel is ``(h, w, in, out)``. A :class:`WeightLayout` says which axes of the
leaf are *stack* axes (independent matrices, e.g. layers), which are contracted by
the matmul (``K``) and which are its outputs (``N``). The compiler reads the
layout off the dot or conv that consumes the leaf; code without the compiler can
use :meth:`WeightLayout.default`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """Axis roles of one parameter leaf.

    Attributes:
      shape: the leaf's shape.
      stack_axes: axes that index independent matrices (scanned layers, experts).
      contract_axes: axes reduced by the matmul, in the order they flatten into K
        (the last one varies fastest, so N:M groups run along it).
      free_axes: output axes, in the order they flatten into N.
    """

    shape: tuple[int, ...]
    stack_axes: tuple[int, ...]
    contract_axes: tuple[int, ...]
    free_axes: tuple[int, ...]

    def __post_init__(self):
        axes = sorted(self.stack_axes + self.contract_axes + self.free_axes)
        if axes != list(range(len(self.shape))):
            raise ValueError(f"layout axes {self} do not partition a leaf of rank {len(self.shape)}")
        if not self.contract_axes or not self.free_axes:
            raise ValueError(f"layout {self} needs at least one contracted and one free axis")

    @classmethod
    def default(cls, shape: tuple[int, ...]) -> "WeightLayout":
        """Flax's convention: the last axis is the output, the rest is contracted."""
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"a weight matrix needs rank >= 2, got shape {shape}")
        return cls(shape, (), tuple(range(len(shape) - 1)), (len(shape) - 1,))

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.stack_axes)

    @property
    def k(self) -> int:
        return math.prod(self.shape[a] for a in self.contract_axes)

    @property
    def n(self) -> int:
        return math.prod(self.shape[a] for a in self.free_axes)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return (*self.stack_shape, self.k, self.n)

    @property
    def _perm(self) -> tuple[int, ...]:
        return self.stack_axes + self.contract_axes + self.free_axes

    def to_matrix(self, leaf: jax.Array) -> jax.Array:
        """Leaf -> ``(*stack, K, N)``."""
        if tuple(leaf.shape) != self.shape:
            raise ValueError(f"leaf shape {leaf.shape} does not match layout shape {self.shape}")
        return jnp.transpose(leaf, self._perm).reshape(self.matrix_shape)

    def from_matrix(self, matrix: jax.Array) -> jax.Array:
        """``(*stack, K, N)`` -> leaf (inverse of :meth:`to_matrix`)."""
        permuted_shape = tuple(self.shape[a] for a in self._perm)
        inverse = tuple(int(i) for i in np.argsort(self._perm))
        return jnp.transpose(matrix.reshape(permuted_shape), inverse)

    def describe(self) -> str:
        stack = "×".join(map(str, self.stack_shape))
        return f"{stack + ' × ' if stack else ''}{self.k}×{self.n}"
