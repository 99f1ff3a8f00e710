"""Smoke test of an installed (non-editable) sparsejax: sparsify + lower + one optimizer.

Run from outside the source tree, with the wheel installed: it fails if sparsejax is imported
from the checkout instead of site-packages, or if any subpackage is missing from the wheel.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj
from sparsejax import optim

source_tree = os.environ.get("SPARSEJAX_SOURCE_TREE")
if source_tree and os.path.abspath(sj.__file__).startswith(os.path.abspath(source_tree) + os.sep):
    sys.exit(f"wheel smoke: sparsejax was imported from the source tree ({sj.__file__})")

params = {"w1": jax.random.normal(jax.random.key(0), (16, 32)),
          "w2": jax.random.normal(jax.random.key(1), (32, 8))}
fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
x = jax.random.normal(jax.random.key(2), (4, 16))

# sparsify: block masks on w1, 2:4 on w2
sfn = sj.sparsify(fn, [sj.Block("w1", 0.5, block=(8, 8)), sj.NM("w2", 2, 4)])
sparams, sstate = sfn.init(params, x)
y = sfn(sparams, sstate, x)
dense = jax.tree.map(lambda w, m: w * m, params, sstate["masks"])
np.testing.assert_allclose(y, fn(dense, x), rtol=1e-5, atol=1e-5)

# lower: the block-sparse kernel (interpret mode on CPU) computes the same function
fast = sfn.lower(sstate, interpret=True)
np.testing.assert_allclose(fast(sparams, sstate, x), y, rtol=1e-5, atol=1e-5)

# one optimizer: RigL around Adam, a few steps
tx = optim.rigl(optax.adam(1e-2), 0.5, end_step=4, update_every=2, layouts=sfn.layouts)
state = tx.init(sparams)
loss = lambda p, m: jnp.mean(sfn(p, {"masks": m}, x) ** 2)
for _ in range(3):
    grads = jax.grad(loss)(sparams, optim.current_masks(state))
    updates, state = tx.update(grads, state, sparams)
    sparams = optax.apply_updates(sparams, updates)
assert np.isfinite(float(loss(sparams, optim.current_masks(state))))
# every sparsejax module came from the installed package (an editable install elsewhere could
# otherwise supply a subpackage missing from the wheel)
installed = os.path.dirname(os.path.abspath(sj.__file__)) + os.sep
strays = sorted(name for name, module in list(sys.modules.items())
                if name.split(".")[0] == "sparsejax" and getattr(module, "__file__", None)
                and not os.path.abspath(module.__file__).startswith(installed))
if strays:
    sys.exit(f"wheel smoke: modules not from the installed package {installed}: "
             + ", ".join(f"{n} ({sys.modules[n].__file__})" for n in strays))
print(f"wheel smoke: ok (sparsejax from {os.path.dirname(sj.__file__)})")
