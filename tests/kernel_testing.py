"""What the kernel tests share: the check that a kernel wrote every output, and the comparison
with its plain-JAX reference.

Kernels called with ``poison=True`` (and every Mosaic GPU kernel in interpret mode) start
their outputs as NaN, so an entry the kernel never wrote stays NaN: :func:`assert_written`
catches it, and :func:`assert_matches_reference` checks it before measuring the error.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def jit_call(f, *args, **static):
    """``f(*args, **static)`` as one compiled program (``static``: sizes, flags, tilings).

    Run op by op, each operation at each new shape was a program of its own to compile, which
    was most of the kernel tests' time; jitted, the same function is one program."""
    return jax.jit(functools.partial(f, **static))(*args)


def normal(seed, shape, dtype=np.float32) -> jax.Array:
    """Standard normal entries drawn by numpy (a jax.random draw compiles a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def as_float64(a) -> np.ndarray:
    """``a`` as a float64 numpy array (bfloat16 and float16 through float32)."""
    a = jnp.asarray(a) if not isinstance(a, np.ndarray) else a
    if a.dtype in (jnp.bfloat16, jnp.float16):
        a = jnp.asarray(a, jnp.float32)
    return np.asarray(a, np.float64)


def assert_written(*outputs) -> None:
    """Every entry of every output (pytrees allowed) is finite: none was left unwritten (NaN)."""
    for leaf in jax.tree.leaves(outputs):
        assert np.isfinite(as_float64(leaf)).all(), (
            "non-finite entries: an output the kernel never wrote reads NaN (poisoned)")


def rel_error(a, b) -> float:
    """``|a - b| / |b|`` in the Frobenius norm, in float64."""
    a, b = as_float64(a), as_float64(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_matches_reference(out, ref, tol: float) -> None:
    """``out`` was written everywhere and is within relative error ``tol`` of ``ref``."""
    assert_written(out)
    assert np.shape(out) == np.shape(ref), f"shape {np.shape(out)} != reference {np.shape(ref)}"
    err = rel_error(out, ref)
    assert err < tol, f"relative error {err:.3g} to the reference exceeds {tol}"
