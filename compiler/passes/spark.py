"""The Spark pass: statistical top-k on FFN pre-activations and attention scores.

Hooks the output of the eqn that produces each selected site's value (see
:mod:`sparsejax.compiler.activation_sites`) and replaces it by its statistical
top-k (:func:`sparsejax.topk.statistical_topk`), so the model's own activation
function or softmax then runs on the sparse value.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from sparsejax.kernels import path_choice
from sparsejax.kernels import statistical_topk as statistical_topk_kernel
from sparsejax.compiler.activation_sites import ActivationSite
from sparsejax.compiler.passes.activation import ActivationRewrite
from sparsejax.compiler.passes.base import differentiated, with_backward


def _valid_scores(x):
    """Scores the model has not masked: models mask with the dtype's min or -inf."""
    return x > jnp.asarray(jnp.finfo(x.dtype).min, x.dtype) / 2


def _topk_args(rule, site: ActivationSite, x) -> dict:
    """The top-k's arguments at one site (besides ``x`` and ``impl``)."""
    args = dict(rule.k_args(site.width), stop_gradient_threshold=rule.stop_gradient_threshold)
    if site.kind == "attention":
        # the scores the model has not masked (_valid_scores), in the kernel's form
        return dict(args, mode="hard", fill=float(jnp.finfo(x.dtype).min),
                    valid_above=float(jnp.finfo(x.dtype).min) / 2)
    return dict(args, mode=rule.effective_mode)


def apply_topk(rule, site: ActivationSite, x):
    """``rule``'s top-k of one site's value; with ``impl="auto"``, by the path chosen for the
    site's shape (:func:`topk_path`)."""
    args = _topk_args(rule, site, x)
    impl = rule.impl if rule.impl != "auto" else topk_path(site, x, args).name
    return statistical_topk_kernel.statistical_topk(x, **args, impl=impl)


def topk_path(site: ActivationSite, x, args: dict):
    """The faster of the one-pass kernel and XLA's top-k for this site's value, by
    :func:`~sparsejax.kernels.path_choice.choose` (the kernel where nothing is measured, as
    ``impl="auto"`` always meant; XLA's where the kernel does not apply).

    Timed alone the kernel wins (one launch against XLA's reductions), but in a program XLA
    fuses its own top-k with the ops around it (the scores' product, the softmax), which a
    Pallas call splits apart: at decode an H200 ran the attention fusions of a Spark LM at
    15 µs per layer against dense's 10 beside the kernel's 2. So XLA's path is ``movable``:
    program tuning tries it whatever it measured alone."""
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    why = statistical_topk_kernel.supported(spec, **{k: v for k, v in args.items()
                                                     if k in ("k", "k_frac", "mode", "valid_above")})
    candidates = [
        path_choice.Candidate("pallas", lambda v: statistical_topk_kernel.statistical_topk(
            v, **args, impl="pallas"), why, "statistical top-k kernel (Pallas)"),
        path_choice.Candidate("xla", lambda v: statistical_topk_kernel.statistical_topk(
            v, **args, impl="xla"), None, "statistical top-k (XLA)", movable=True)]
    pass_kind = "fwd"
    if differentiated():
        pass_kind = "fwd+bwd"
        candidates = [c if c.unsupported else dataclasses.replace(c, fn=with_backward(c.fn))
                      for c in candidates]
    signature = (f"{site.kind},shape={'x'.join(map(str, x.shape))},dtype={jnp.dtype(x.dtype).name},"
                 + ",".join(f"{k}={v}" for k, v in sorted(args.items()) if k != "fill")
                 + f",{pass_kind}")
    # Not checked against each other on the device: at a tie with the threshold the two
    # may keep an entry apiece differently (the tests bound that); both are exact top-k.
    return path_choice.choose("statistical_topk", signature, candidates, [spec], baseline="xla")


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
