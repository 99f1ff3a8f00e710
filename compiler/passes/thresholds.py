"""Threshold and ReLU-substitution passes: rewrites of an FFN's or a linear layer's input.

* :func:`threshold_hook`: ``x -> where(|x| > t, x, 0)`` on one eqn input (TEAL, CATS,
  CHESS); ``t`` is the point's state from ``sstate["thresholds"]`` (one per layer of a
  scanned stack, per channel for CHESS FFN points), broadcast along the last axis.
* :class:`ReLURewrite`: ProSparse's activation substitution, registered for
  :class:`~sparsejax.rules.ReLUActivation`: the FFN's ``act(gate)`` (where it meets the
  up branch) becomes ``relu(gate)`` (FATReLU with a threshold).
* :func:`l1_hook`: emits the mean ``|x|`` and the zero fraction of an FFN activation, the
  auxiliary output of ``sfn.with_aux`` a training loop adds to its loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.compiler.activation_sites import ActivationSite, _ELEMENTWISE
from sparsejax.compiler.passes.activation import ActivationRewrite, SiteHooks

# The activation function between the pre-activation and its consumer must be computed
# entry by entry for a ReLU to stand in for it (casts and copies move nothing).
_ENTRYWISE = _ELEMENTWISE | {"convert_element_type", "copy", "copy_p", "reduce_precision",
                             "custom_jvp_call", "pjit", "jit"}


def threshold_hook(operand: int):
    def hook(eqn, invals, threshold):
        invals = list(invals)
        x = invals[operand]
        invals[operand] = jnp.where(jnp.abs(x) > threshold.astype(x.dtype), x, jnp.zeros((), x.dtype))
        return invals
    return hook


def l1_hook(key, operand: int, emit):
    """Emits ``(mean |x|, fraction of zeros)`` of input ``operand`` (after other hooks)."""
    def hook(eqn, invals, state):
        x = invals[operand].astype(jnp.float32)
        emit(key, jnp.stack([jnp.mean(jnp.abs(x)), jnp.mean((x == 0).astype(jnp.float32))]))
        return invals
    return hook


class ReLURewrite(ActivationRewrite):
    """``act(gate) -> relu(gate)`` (``where(gate > threshold, gate, 0)``) at each FFN."""

    def check(self, rule, site: ActivationSite) -> None:
        if site.act_key is None:
            raise ValueError(f"{rule.describe()}: the FFN at {site.describe()} has no activation "
                             "output the compiler can locate")
        bad = sorted(set(site.act_ops) - _ENTRYWISE)
        if bad:
            raise ValueError(f"{rule.describe()}: the FFN at {site.describe()} computes its "
                             f"activation with {bad}, not entry by entry; ReLU substitution "
                             "needs an elementwise activation (select other FFNs by pattern)")

    def hooks(self, rule, site: ActivationSite) -> SiteHooks:
        seen = {}
        threshold = float(rule.threshold)

        def keep_pre(eqn, outvals):
            seen["pre"] = outvals[site.output]
            return outvals

        def substitute(eqn, invals, state):
            invals = list(invals)
            old, pre = invals[site.act_operand], seen.pop("pre")
            if tuple(jnp.shape(pre)) != tuple(jnp.shape(old)):
                raise ValueError(f"{rule.describe()}: the FFN at {site.describe()} reshapes its "
                                 "activation before the up branch; ReLU substitution needs "
                                 "act(gate) shaped like gate")
            invals[site.act_operand] = jnp.where(pre > threshold, pre,
                                                 jnp.zeros((), pre.dtype)).astype(old.dtype)
            return invals

        return SiteHooks({site.key: keep_pre}, {site.act_key: substitute})

    def measuring_hooks(self, rule, site: ActivationSite, index: int, record) -> SiteHooks:
        """The substitution, reporting the fraction of pre-activations above zero (before)
        and above the ReLU's threshold (after: the entries the ReLU lets through)."""
        h = self.hooks(rule, site)
        keep_pre, threshold = h.outputs[site.key], float(rule.threshold)

        def measure(eqn, outvals):
            pre = outvals[site.output]
            jax.debug.callback(record, index, jnp.mean((pre > 0).astype(jnp.float32)),
                               jnp.mean((pre > threshold).astype(jnp.float32)))
            return keep_pre(eqn, outvals)

        return SiteHooks({site.key: measure}, h.inputs)
