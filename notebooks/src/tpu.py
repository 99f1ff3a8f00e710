# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] slot="title"
# # sparsejax on a TPU


# %% [markdown] slot="notes"
# ## TPU notes
#
# **Set-up on a Cloud TPU VM** (or Colab's TPU runtime): clone the repository, then
# `pip install -e ".[dev]"` and `pip install "jax[tpu]"` (JAX's TPU build), and open this
# notebook from `notebooks/`.
#
# **Which kernels apply on a TPU** (every one sits beside a plain-JAX reference, and
# `sfn.report()` says per site which one ran and why):
#
# | sparsity | path on TPU | needs |
# |---|---|---|
# | `Block` masks after `sfn.lower(sstate)` | Pallas TPU block-sparse kernel (`PrefetchScalarGridSpec`: the block tables are scalar-prefetched) | blocks that are multiples of 128 (the MXU tile) |
# | `Prune`, `NM`, `Channels` masks | XLA: the masked weight is multiplied densely | |
# | `Monarch` | two XLA einsums (the fused Monarch kernel is GPU-only) | |
# | `SparkTopK` | statistical top-k in XLA (no sort: the TPU's `lax.top_k` is slow) | |
#
# **What to expect.** The TPU kernel is tested in interpret mode on CPU but has **not been
# measured on a TPU** (none was available when the results were recorded), so the timing cell
# below is the first measurement: read it as such. TPUs have no N:M hardware path.


# %% slot="device"
import jax
print("JAX", jax.__version__, "| backend:", jax.default_backend())
for d in jax.devices():
    print(" ", d.platform, d.device_kind)
if jax.default_backend() != "tpu":
    print("No TPU: this notebook runs at small sizes and every kernel falls back to its reference.")


# %% [markdown] slot="lower"
# ## 4. From masks to speed: the block-sparse kernel on the TPU
#
# Masks alone make nothing faster. `sfn.lower(sstate)` returns a copy whose `Block`-masked
# matmuls call the Pallas TPU block-sparse kernel (128-multiples blocks, tables in scalar
# prefetch). Its report says, per site, which path ran and why. The timing below is a median
# after warm-up, with XLA's dense matmul measured in the same process; on a CPU it only shows
# the fallback.


# %% after="lower_code"
from sparsejax.kernels.path_choice import median_seconds


def median_ms(fn, *args):
    """Median of back-to-back calls after warm-up (the library's own timing helper)."""
    return 1e3 * median_seconds(fn, *args, calls=3, repeats=10)


dense_ms = median_ms(jax.jit(wide.apply), wide_params, x)
lowered_ms = median_ms(jax.jit(fast), b_params, b_state, x)
print(f"{KERNEL_TOKENS}×{KERNEL_WIDTH}→{KERNEL_WIDTH}, two layers, density 0.25, {dtype}:")
print(f"  XLA dense {dense_ms:.3f} ms | lowered {lowered_ms:.3f} ms | {dense_ms / lowered_ms:.2f}× dense")
if BACKEND == "cpu":
    print("  (CPU: the lowered program is the reference; no speed-up is expected)")
