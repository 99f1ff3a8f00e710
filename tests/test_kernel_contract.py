"""Every kernel module follows the one contract of sparsejax/kernels/backends.py."""

import jax
import jax.numpy as jnp
import pytest

from sparsejax.kernels import backends
from sparsejax.kernels import block_sparse as bs
from sparsejax.kernels import monarch_matmul as mk
from sparsejax.kernels import nm_compressed as nm
from sparsejax.kernels import spark_ffn as sf
from sparsejax.kernels import sparse_input_gemv as sig
from sparsejax.kernels import sparse_output_gemv as sog
from sparsejax.kernels import statistical_topk as st

_FACTORS = {"w1": jax.ShapeDtypeStruct((4, 64, 64), jnp.bfloat16),
            "w2": jax.ShapeDtypeStruct((4, 64, 64), jnp.bfloat16)}

# module -> a call of its supported(...) that a GPU kernel takes, given backend/interpret.
SUPPORTED = {
    "block_sparse": lambda **kw: bs.supported((1024, 1024), jnp.bfloat16, (128, 128), **kw),
    "monarch_matmul": lambda **kw: mk.supported((128, 256), _FACTORS, **kw),
    "nm_compressed": lambda **kw: nm.supported((1024, 1024), jnp.bfloat16, 1, **kw),
    "sparse_input_gemv": lambda **kw: sig.supported((1024, 1024), jnp.bfloat16, 1, **kw),
    "sparse_output_gemv": lambda **kw: sog.supported((1024, 1024), jnp.bfloat16, 1, **kw),
    "spark_ffn": lambda **kw: sf.supported(1, **kw),
    "statistical_topk": lambda **kw: st.supported(jnp.ones((2, 256), jnp.bfloat16), k=8, **kw),
}
REFERENCES = {
    bs: "block_sparse_matmul_reference", mk: "monarch_matmul_reference",
    nm: "nm_matmul_reference", sig: "sparse_input_gemv_reference",
    sog: "sparse_output_gemv_reference", sf: "topk_ffn_decode_reference",
    st: "statistical_topk_reference",
}


def test_every_kernel_has_its_reference_and_supported():
    for module, reference in REFERENCES.items():
        assert callable(getattr(module, reference)), module.__name__
        assert callable(module.supported), module.__name__


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_supported_answers_none_or_a_reason(name):
    call = SUPPORTED[name]
    assert call(backend="gpu") is None                       # the GPU kernel takes this call
    assert call(interpret=True) is None                      # and interpret mode runs it on CPU
    for backend in ("cpu", "reference"):                     # no kernel: a one-line reason
        reason = call(backend=backend)
        assert isinstance(reason, str) and reason and "\n" not in reason
    with pytest.raises(ValueError, match="interpret must be a bool"):
        call(interpret="mosaic_gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="cuda")


def test_resolve_maps_platforms_and_interpret_mode():
    kernels = {"gpu": backends.MOSAIC_GPU, "tpu": backends.TPU}
    resolve = lambda b, i=False: backends.resolve(b, i, kernels=kernels, interpreted=backends.TPU,
                                                  where="op")
    assert resolve("gpu") == resolve("mosaic_gpu") == backends.MOSAIC_GPU
    assert resolve("tpu") == backends.TPU
    assert resolve("cpu") == resolve("reference") == backends.REFERENCE
    assert resolve(None, True) == resolve("cpu", True) == backends.TPU
    assert resolve("mosaic_gpu", True) == backends.MOSAIC_GPU
    with pytest.raises(ValueError, match=r"op: backend must be one of \('mosaic_gpu', 'tpu', "
                                         r"'reference'\)"):
        resolve("triton")
