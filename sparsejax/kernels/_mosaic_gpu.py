"""What the Mosaic GPU kernels share: swizzled shared-memory layouts and interpret parameters.

Imported lazily by the kernels (``jax.experimental.pallas.mosaic_gpu`` is only
needed when a Mosaic GPU kernel is traced).
"""

from __future__ import annotations

import jax.numpy as jnp


def swizzled(cols: int, dtype) -> tuple:
    """Tiling and swizzle transforms of a shared-memory tile ``cols`` elements wide (wgmma operands)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def interpret_params():
    """Mosaic GPU interpret parameters (``plgpu.InterpretGPUParams``; private before JAX 0.11).

    Uninitialised memory reads as NaN, so an output tile the kernel never writes
    shows up in the comparison with the reference (the kernel's outputs are
    poisoned).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:   # JAX 0.10
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params(uninitialized_memory="nan")
