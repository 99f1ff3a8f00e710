"""The layout of a ``scan`` equation, read the same way on every supported JAX version.

A scan's operands are ``consts + carry + xs`` and its results ``carry + ys``. JAX has
carried the counts as ``num_consts`` / ``num_carry`` params; where a version does not,
they follow from the avals alone: an ``x`` operand (and a ``y`` result) has the scan
length as an extra leading axis over the body's value, a const or carry has not.
"""

from __future__ import annotations

from typing import NamedTuple


class ScanLayout(NamedTuple):
    num_consts: int
    num_carry: int
    length: int
    reverse: bool
    unroll: int | bool


def _body(eqn):
    jaxpr = eqn.params["jaxpr"]
    return getattr(jaxpr, "jaxpr", jaxpr)


def scan_layout(eqn) -> ScanLayout:
    """``(num_consts, num_carry, length, reverse, unroll)`` of a scan equation."""
    p = eqn.params
    body = _body(eqn)
    length = p.get("length")
    if length is None:
        length = next(o.aval.shape[0] for o, b in zip(eqn.outvars[::-1], body.outvars[::-1])
                      if o.aval.shape != b.aval.shape)
    if "reverse" in p:
        reverse = bool(p["reverse"])
    else:
        reverse = not p.get("forward", True)
    unroll = p.get("unroll", 1)
    if "num_consts" in p and "num_carry" in p:
        return ScanLayout(p["num_consts"], p["num_carry"], length, reverse, unroll)
    # Results: carries keep the body's shape, ys gain the leading length axis.
    num_carry = 0
    for out, b in zip(eqn.outvars, body.outvars):
        if tuple(out.aval.shape) != tuple(b.aval.shape):
            break
        num_carry += 1
    # Operands: xs (trailing) gain the leading axis; the rest are consts then carries.
    num_xs = 0
    for inv, b in zip(eqn.invars[::-1], body.invars[::-1]):
        if tuple(inv.aval.shape) == tuple(b.aval.shape):
            break
        num_xs += 1
    num_consts = len(eqn.invars) - num_xs - num_carry
    return ScanLayout(num_consts, num_carry, length, reverse, unroll)
