#!/usr/bin/env bash
# The kernel tests compiled for the GPU: a kernel is proven only where it ran there, and the
# suite runs every kernel in Pallas interpret mode on CPU. Copies tests/ aside, turns each
# `interpret=True` into `interpret=False`, and runs the named test files with JAX on the GPU.
#   bash benchmarks/gpu_kernel_tests.sh tests/test_topk_kernel.py tests/test_sparse_input_gemv.py
#   (pytest options pass through: ... tests/test_topk_kernel.py -k chunk)
set -eu
source benchmarks/device_env.sh
work=$(mktemp -d)
cp -r tests "$work/tests"
sed -i 's/interpret=True/interpret=False/g' "$work"/tests/*.py
files=()
for f in "$@"; do
  case "$f" in tests/*) files+=("$(basename "$f")") ;; *) files+=("$f") ;; esac
done
# From the copy's folder, so `sparsejax` is the package device_env.sh laid out, not the checkout's.
cd "$work/tests"
# float32 references at full precision: XLA's default on the GPU rounds a float32 dot's inputs
# (TF32-like, ~3e-4 relative), far above the kernels' own error the tests bound.
JAX_DEFAULT_MATMUL_PRECISION=highest JAX_PLATFORMS=cuda XLA_FLAGS= python -m pytest -q -p no:cacheprovider "${files[@]}"
