"""The one contract every kernel in :mod:`sparsejax.kernels` follows, and the names it uses.

Each kernel module offers, beside its kernel wrapper:

* ``*_reference(...)``: the plain-JAX twin the tests compare against;
* ``supported(..., backend=None, interpret=False) -> str | None``: why the
  kernel cannot run this call (``None`` when it can). The wrapper then runs the
  reference (the block-sparse and N:M wrappers) or raises with the reason (where a
  wrapper's ``impl`` names a kernel path, as the Spark FFN decode's); the compiler
  passes ask ``supported`` first and put the reason in their report.

and takes the same two arguments:

* ``backend``: which implementation runs. A kernel backend, ``"mosaic_gpu"``
  (Pallas Mosaic GPU, Hopper), ``"triton"`` (Pallas on the Triton backend) or
  ``"tpu"`` (Pallas Mosaic TPU), or ``"reference"`` (the plain-JAX twin).
  ``None``: the module's kernel for JAX's default platform (the reference where
  it has none). A platform name (``"gpu"``, ``"tpu"``, ``"cpu"``) means that
  platform's kernel, so a caller holding a platform (the lowering passes) can
  pass it through.
* ``interpret``: a bool, and only that: run the chosen Pallas kernel in
  interpret mode (on CPU; tests). With ``backend`` None or a platform it runs
  the module's interpretable kernel (the ``pallas_call`` one where a module has
  several; name another with ``backend``).

A backend the module has no kernel for is a ValueError naming the ones it has.

``poison=True`` (tests) makes a ``pallas_call`` kernel's output start as NaN
(:func:`poison_output`), so an entry the kernel never writes fails the
comparison with the reference (Mosaic GPU interpret mode does this itself).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

__all__ = ["MOSAIC_GPU", "TRITON", "TPU", "REFERENCE", "KERNEL_BACKENDS", "PLATFORMS", "resolve",
           "reference_reason", "poison_output", "check_packed_operands", "dense_reference"]

MOSAIC_GPU = "mosaic_gpu"
TRITON = "triton"
TPU = "tpu"
REFERENCE = "reference"
KERNEL_BACKENDS = (MOSAIC_GPU, TRITON, TPU)
PLATFORMS = ("gpu", "tpu", "cpu")


def resolve(backend: str | None, interpret, *, kernels: Mapping[str, str], interpreted: str,
            where: str) -> str:
    """The implementation a call runs: one of ``kernels``' values or :data:`REFERENCE`.

    Args:
      backend, interpret: the caller's arguments (see the module doc).
      kernels: the module's kernel per platform, e.g. ``{"gpu": "mosaic_gpu", "tpu": "tpu"}``.
      interpreted: the kernel ``interpret=True`` runs when ``backend`` is None.
      where: the function's name, for errors.
    """
    if not isinstance(interpret, bool):
        raise ValueError(f"{where}: interpret must be a bool (interpret mode only; pick the kernel "
                         f"with backend=...), got {interpret!r}")
    if backend is None or backend in PLATFORMS:
        if interpret:   # a platform says where the program runs; interpret mode runs on CPU
            return interpreted
        return kernels.get(backend or jax.default_backend(), REFERENCE)
    if backend == REFERENCE or backend in kernels.values():
        return backend
    have = tuple(dict.fromkeys(kernels.values())) + (REFERENCE,)
    raise ValueError(f"{where}: backend must be one of {have} (or a platform, one of {PLATFORMS}), "
                     f"got {backend!r}")


def reference_reason(op: str, backend: str | None, fallback: str = "plain-JAX reference") -> str:
    """The reason ``supported`` gives when ``backend`` resolved to the reference (``fallback``:
    what computes instead, for a kernel whose fallback is not its reference, e.g. "dense XLA")."""
    if backend == REFERENCE:
        return f"backend='reference' asks for the {fallback}"
    platform = backend if backend in PLATFORMS else jax.default_backend()
    return f"no {op} kernel on backend {platform!r}: {fallback}"


def check_packed_operands(x, packed, weight_type: type, described: str, where: str) -> None:
    """One-line errors for ``x @ W`` with ``W`` held in a packed form (``weight_type``, with
    ``.shape`` the dense ``(K, N)``); ``described`` names it, e.g. "a BlockSparseWeight (see pack)"."""
    if not isinstance(packed, weight_type):
        raise TypeError(f"{where}: packed must be {described}, got {type(packed).__name__}")
    if x.ndim < 1 or x.shape[-1] != packed.shape[0]:
        raise ValueError(f"{where}: x's last axis {x.shape[-1:]} must equal the weight's K = "
                         f"{packed.shape[0]} (y = x @ W, W of shape {packed.shape})")


def dense_reference(x, packed):
    """The plain-JAX twin of a packed-weight matmul: ``packed.to_dense()``, then one XLA dot
    accumulating in float32, in the operands' promoted dtype."""
    dtype = jnp.result_type(x.dtype, packed.dtype)
    y = jnp.matmul(x.astype(dtype), packed.to_dense().astype(dtype),
                   preferred_element_type=jnp.float32)
    return y.astype(dtype)


def poison_output(operands: list, out_shape, *, scalar_prefetch: int = 0) -> dict:
    """Appends a NaN-filled buffer of ``out_shape`` to ``operands``; returns the aliases making it output 0.

    Pass the result as ``pallas_call(..., input_output_aliases=...)``; the kernel's
    ``in_specs`` (if any) need the output's spec appended too. ``scalar_prefetch``:
    operands before ``operands`` in the call (they count in the alias index).
    """
    operands.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
    return {scalar_prefetch + len(operands) - 1: 0}
