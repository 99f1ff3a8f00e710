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
# # sparsejax on a GPU


# %% [markdown] slot="notes"
# ## GPU notes
#
# **Set-up on Colab** (Runtime → Change runtime type → a GPU): clone the repository, then
# `pip install -e ".[gpu]"` in it (JAX's CUDA 12 build) and restart the runtime. On your own
# machine the same command works in a fresh virtual environment.
#
# **Which kernels apply on a GPU** (every one sits beside a plain-JAX reference, and
# `sfn.report()` says per site which one ran and why):
#
# | sparsity | path on GPU | needs |
# |---|---|---|
# | `Block` masks after `sfn.lower(sstate)` | Mosaic GPU block-sparse kernel (`plgpu.emit_pipeline` + `wgmma`) | a Hopper GPU (H100/H200), bf16/f16 weights, blocks of 64 or 128 |
# | `Prune`, `NM`, `Channels` masks | XLA: the masked weight is multiplied densely (masks alone make nothing faster) | |
# | `NM` weights in decode (`sparsejax.kernels.nm_compressed`) | compressed N:M GEMV (Pallas, Triton backend), batch ≤ 2 | 0.80× of dense for 2:4 on H100: compact memory, not speed yet |
# | `Monarch` | two XLA einsums (the fused Pallas kernel is slower than them; see the results) | |
# | `SparkTopK` | statistical top-k in XLA (three passes, no sort) | |
#
# Hopper's 2:4 sparse tensor cores are not reachable from Pallas, so N:M does not turn into
# matmul speed here. On an A100/T4 (Colab's free tier) the Mosaic GPU kernel does not apply:
# `lower` keeps every site on the reference and the report says so.
#
# **What to expect.** Measured on an H100 (bf16, 8192³, 128×128 blocks): 1.93× / 3.57× / 7.18×
# faster than XLA's dense matmul at density 0.5 / 0.25 / 0.1 (forward). At this notebook's
# sizes the numbers are smaller: kernel launches and the pipeline fill weigh more.
# The Pallas Triton backend warns that it is deprecated on JAX ≥ 0.11; that warning is harmless.


# %% slot="device"
import subprocess
import jax
print("JAX", jax.__version__, "| backend:", jax.default_backend())
for d in jax.devices():
    print(" ", d.platform, d.device_kind)
if jax.default_backend() == "gpu":
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv"], capture_output=True, text=True).stdout)
    HOPPER = any("H100" in d.device_kind or "H200" in d.device_kind for d in jax.devices())
    print("Hopper (Mosaic GPU block-sparse kernel applies):", HOPPER)
else:
    print("No GPU: this notebook runs at small sizes and every kernel falls back to its reference.")


# %% [markdown] slot="lower"
# ## 4. From masks to speed: the block-sparse kernel on the GPU
#
# Masks alone make nothing faster. `sfn.lower(sstate)` returns a copy whose `Block`-masked
# matmuls call the Mosaic GPU block-sparse kernel (Hopper, bf16, 64- or 128-blocks), whose
# work is proportional to the kept blocks. Its report says, per site, which path ran and why.
# The timing below is a median after warm-up, with XLA's dense matmul measured in the same
# process; on a CPU it only shows the fallback.


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
