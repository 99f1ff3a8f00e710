"""A scan's layout is read the same way whether or not JAX records num_consts/num_carry."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from sparsejax.compiler.scan_params import ScanLayout, scan_layout


class _Eqn:   # an equation whose params lack what newer JAX versions may not record
    def __init__(self, eqn, drop):
        self.params = {k: v for k, v in eqn.params.items() if k not in drop}
        self.invars, self.outvars = eqn.invars, eqn.outvars


def _scan_eqn(reverse):
    def f(c, w, xs, s):
        def body(carry, x):   # a const (w), two carries (one shaped like an x), ys of two kinds
            a, b = carry
            return (a + x @ w, b * s), (a.sum(), x * 2.0)
        return lax.scan(body, (c, xs[0]), xs, reverse=reverse)
    jaxpr = jax.make_jaxpr(f)(jnp.ones(4), jnp.ones((4, 4)), jnp.ones((7, 4)), jnp.float32(2))
    return next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan")


@pytest.mark.parametrize("reverse", [False, True])
def test_layout_from_avals_matches_the_recorded_params(reverse):
    eqn = _scan_eqn(reverse)
    recorded = scan_layout(eqn)
    assert recorded.num_carry == 2 and recorded.length == 7 and recorded.reverse == reverse
    derived = scan_layout(_Eqn(eqn, {"num_consts", "num_carry", "length"}))
    assert derived == recorded
    flipped = _Eqn(eqn, {"reverse"})
    flipped.params["forward"] = not reverse
    assert scan_layout(flipped).reverse == reverse
    assert isinstance(derived, ScanLayout)
