"""Where a block-sparse matmul with short block columns spends its time (GPU).

    python benchmarks/block_sparse_probe.py

For x(8192, K) @ W(K, N) at several densities: the whole block_sparse_matmul, XLA's
dense product, and the XLA scatter that zeroes the output columns with no kept block
(done outside the kernel today), timed alone. Prints one table.
"""

from __future__ import annotations

import sys
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.append(str(pathlib.Path(__file__).resolve().parent))
from timing import median_seconds, rel_err  # noqa: E402

from sparsejax.kernels import block_sparse  # noqa: E402


def main():
    rows = ["| K→N | density | empty cols | dense µs | kernel µs | vs dense | zero-scatter µs |",
            "|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    m = 8192
    for k, n in ((1024, 4096), (4096, 1024), (8192, 8192)):
        x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(jnp.bfloat16)
        w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(jnp.bfloat16)
        dense = jax.jit(lambda x, w: x @ w)
        t_dense = median_seconds(dense, x, w)
        for density in (0.5, 0.1):
            bm = rng.random((k // 128, n // 128)) < density
            packed = block_sparse.pack(w, bm, (128, 128))
            f = jax.jit(lambda x, b: block_sparse.block_sparse_matmul(x, b))
            err = rel_err(f(x, packed), x.astype(jnp.float32) @ packed.to_dense().astype(jnp.float32))
            t = median_seconds(f, x, packed)
            empty = np.flatnonzero(~bm.any(0))
            cols = (empty[:, None] * 128 + np.arange(128)).reshape(-1)
            out = jnp.ones((m, n), jnp.bfloat16)
            z = jax.jit(lambda o: o.at[:, cols].set(0))
            tz = median_seconds(z, out) if cols.size else 0.0
            rows.append(f"| {k}→{n} | {density} | {empty.size}/{n // 128} | {1e6 * t_dense:.0f} | "
                        f"{1e6 * t:.0f} (err {err:.1e}) | {t_dense / t:.2f}× | {1e6 * tz:.0f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
