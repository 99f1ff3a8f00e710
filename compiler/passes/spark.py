"""The Spark pass: statistical top-k on FFN pre-activations and attention scores.

Hooks the output of the eqn that produces each selected site's value (see
:mod:`sparsejax.compiler.activation_sites`) and replaces it by its statistical
top-k (:func:`sparsejax.topk.statistical_topk`), so the model's own activation
function or softmax then runs on the sparse value.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sparsejax.kernels import statistical_topk as statistical_topk_kernel
from sparsejax.compiler.activation_sites import ActivationSite
from sparsejax.compiler.passes.activation import ActivationRewrite


def _valid_scores(x):
    """Scores the model has not masked: models mask with the dtype's min or -inf."""
    return x > jnp.asarray(jnp.finfo(x.dtype).min, x.dtype) / 2


def apply_topk(rule, site: ActivationSite, x):
    """``rule``'s top-k of one site's value."""
    args = rule.k_args(site.width)
    if site.kind == "attention":
        # the scores the model has not masked (_valid_scores), in the kernel's form
        return statistical_topk_kernel.statistical_topk(
            x, **args, mode="hard", fill=jnp.finfo(x.dtype).min,
            valid_above=float(jnp.finfo(x.dtype).min) / 2,
            stop_gradient_threshold=rule.stop_gradient_threshold, impl=rule.impl)
    return statistical_topk_kernel.statistical_topk(
        x, **args, mode=rule.effective_mode, stop_gradient_threshold=rule.stop_gradient_threshold,
        impl=rule.impl)


def topk_hook(rule, site: ActivationSite) -> Callable:
    def hook(eqn, outvals):
        outvals = list(outvals)
        outvals[site.output] = apply_topk(rule, site, outvals[site.output])
        return outvals
    return hook


def measuring_hook(rule, site: ActivationSite, index: int, record: Callable) -> Callable:
    """Applies ``rule`` (if any) and reports the site's densities to the host.

    Before: the fraction of pre-activations above zero (FFN: the neurons a ReLU
    would fire, the "lazy neuron" statistic) or of unmasked scores (attention).
    After: the fraction of entries the top-k keeps.
    """
    def hook(eqn, outvals):
        outvals = list(outvals)
        x = outvals[site.output]
        if site.kind == "attention":
            valid = _valid_scores(x)
            before = jnp.mean(valid.astype(jnp.float32))
        else:
            before = jnp.mean((x > 0).astype(jnp.float32))
        after = before
        if rule is not None:
            x = apply_topk(rule, site, x)
            kept = _valid_scores(x) if site.kind == "attention" else (x != 0)
            after = jnp.mean(kept.astype(jnp.float32))
        jax.debug.callback(record, index, before, after)
        outvals[site.output] = x
        return outvals
    return hook



class SparkRewrite(ActivationRewrite):
    """The Spark pass as an :class:`~sparsejax.compiler.passes.activation.ActivationRewrite`
    (also measures sites no rule selects: their densities before any rewrite)."""

    hook = staticmethod(topk_hook)
    measuring_hook = staticmethod(measuring_hook)
