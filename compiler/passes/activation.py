"""The registry of activation rewrites: how each kind of activation rule rewrites its sites.

Weight rules have :func:`~sparsejax.compiler.passes.register_weight_handler`; activation
rules have this. An :class:`ActivationRewrite` turns one (site, rule) pair of the
activation plan into interpreter hooks: functions ``(eqn, outvals) -> outvals`` on the
eqn whose output is the site's value. Register a new kind with
:func:`register_activation_rewrite`; ``SparseFunction`` asks :func:`activation_hooks`
for the hooks of a whole plan and never names a pass itself.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from sparsejax.compiler.activation_sites import ActivationSite
from sparsejax.compiler.interpreter import HookFn


class SiteHooks(NamedTuple):
    """What one rewritten site adds to the interpreter: output hooks ``(eqn, outvals)`` and
    input hooks ``(eqn, invals, state)``, by eqn key."""

    outputs: dict
    inputs: dict


class ActivationRewrite:
    """The compiled form of one kind of activation rule."""

    def check(self, rule, site: ActivationSite) -> None:
        """Raises a ValueError naming ``rule`` when it cannot rewrite ``site`` (at init)."""

    def hook(self, rule, site: ActivationSite) -> HookFn:
        """The hook that rewrites ``site``'s value (its eqn's output ``site.output``)."""
        raise NotImplementedError

    def hooks(self, rule, site: ActivationSite) -> SiteHooks:
        """Every hook of the rewrite (default: :meth:`hook` on the site's value)."""
        return SiteHooks({site.key: self.hook(rule, site)}, {})

    def measuring_hook(self, rule, site: ActivationSite, index: int, record: Callable) -> HookFn:
        """Like :meth:`hook`, and reports ``record(index, density before, density after)``."""
        raise NotImplementedError

    def measuring_hooks(self, rule, site: ActivationSite, index: int, record: Callable
                        ) -> SiteHooks:
        """Like :meth:`hooks`, and reports the site's densities (default: :meth:`measuring_hook`
        on the site's value)."""
        return SiteHooks({site.key: self.measuring_hook(rule, site, index, record)}, {})


_ACTIVATION_REWRITES: list[tuple[type, ActivationRewrite]] = []


def register_activation_rewrite(rule_type: type, rewrite: ActivationRewrite) -> None:
    """Registers the pass for an activation rule type (most recent registration wins)."""
    _ACTIVATION_REWRITES.insert(0, (rule_type, rewrite))


def activation_rewrite(rule) -> ActivationRewrite:
    for rule_type, rewrite in _ACTIVATION_REWRITES:
        if isinstance(rule, rule_type):
            return rewrite
    raise TypeError(f"no compiler pass rewrites activations for rule {rule.describe()}")


def activation_hooks(plan: Sequence[tuple[ActivationSite, object]]) -> SiteHooks:
    """The hooks of every (site, rule) pair of a plan that has a rule."""
    outputs, inputs = {}, {}
    for site, rule in plan:
        if rule is not None:
            h = activation_rewrite(rule).hooks(rule, site)
            outputs.update(h.outputs)
            inputs.update(h.inputs)
    return SiteHooks(outputs, inputs)


def check_plan(plan) -> None:
    for site, rule in plan:
        if rule is not None:
            activation_rewrite(rule).check(rule, site)


def measuring_hooks(plan, record: Callable) -> SiteHooks:
    """Hooks that apply and measure every site of ``plan``; sites no rule selects are measured
    as they are (the Spark pass's densities before a rewrite: the fraction above zero, or
    unmasked)."""
    from sparsejax.compiler.passes.spark import SparkRewrite
    unruled = SparkRewrite()
    outputs, inputs = {}, {}
    for i, (site, rule) in enumerate(plan):
        h = (activation_rewrite(rule) if rule is not None else unruled).measuring_hooks(
            rule, site, i, record)
        outputs.update(h.outputs)
        inputs.update(h.inputs)
    return SiteHooks(outputs, inputs)
