"""Proximal optimizers for L1, group lasso and sparse group lasso.

Each step takes the inner optimizer's step ``z = w + u`` and applies the
proximal map of the regulariser to the iterate: ``w' = prox(z)``; the returned
update is additive, ``w' - w``.

* :func:`prox_sgd`: the Euclidean prox, scaled by the learning rate:
  L1 is soft-thresholding by ``lr * l1``; a group shrinks as
  ``max(0, 1 - lr * lam_g / ||z_g||) * z_g`` with ``lam_g = group * sqrt(|g|)``.
* :func:`prox_adamw`: the prox in Adam's metric ``D = sqrt(v_hat) + eps``
  (``argmin_x 1/2 ||x - z||_D^2 + lr * R(x)``). L1 is exact per coordinate
  (threshold ``lr * l1 / D_i``). A group is zero when ``||D z_g|| <= tau``;
  otherwise ``x_i = D_i z_i / (D_i + mu)`` where ``mu > 0`` solves the monotone
  equation ``|| D z mu / (D + mu) ||_g = tau``, found by bisection in ``log mu``
  between ``tau min(D) / (a - tau)`` and ``tau max(D) / (a - tau)``
  (``a = ||D z_g||``) with a fixed step count, so it jits. Sparse group lasso is
  the L1 prox followed by the group prox (exact for a diagonal metric).

Half-space step (HSPG, Chen et al. 2021, "Only Train Once"): from
``HalfSpace.start_step`` on, the group term is handled by a half-space
projection instead: zero groups stay zero; for the others the trial point
``z_g - lr * lam_g * w_g / (||w_g|| D)`` replaces the prox, and a group whose
trial point leaves the half-space ``{x : x . w_g >= eps ||w_g||^2}`` is set to
exactly zero. This reaches exact group zeros that the prox approaches slowly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.optim import _common
from sparsejax.optim.groups import GroupIndex, GroupSpec, resolve_groups

__all__ = ["Regularizer", "l1", "group_lasso", "sparse_group_lasso", "HalfSpace",
           "soft_threshold", "group_prox", "prox_sgd", "prox_adamw", "ProxSGDState",
           "ProxAdamWState"]


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """``l1 * ||w||_1 + group * sum_g c_g ||w_g||_2`` with ``c_g = sqrt(|g|)`` (or 1).

    L1 applies to the grouped leaves when ``groups`` is given, otherwise to the
    leaves of ndim >= 2 (restricted by ``where(path, leaf)``).
    """

    l1: float = 0.0
    group: float = 0.0
    groups: tuple[GroupSpec, ...] = ()
    scale_by_size: bool = True
    where: Callable | None = None

    def __post_init__(self):
        for name in ("l1", "group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"regularizer weight {name} must be a number >= 0, got {v!r}")
        if self.group > 0 and not self.groups:
            raise ValueError("a group penalty needs groups (output_channels, channels, ...)")


def l1(weight: float, where: Callable | None = None) -> Regularizer:
    """``weight * ||w||_1`` over leaves of ndim >= 2 (or those ``where`` selects)."""
    return Regularizer(l1=weight, where=where)


def group_lasso(weight: float, groups: Sequence[GroupSpec] | GroupSpec,
                scale_by_size: bool = True) -> Regularizer:
    """``weight * sum_g sqrt(|g|) ||w_g||_2`` over ``groups``."""
    groups = (groups,) if isinstance(groups, GroupSpec) else tuple(groups)
    return Regularizer(group=weight, groups=groups, scale_by_size=scale_by_size)


def sparse_group_lasso(l1_weight: float, group_weight: float,
                       groups: Sequence[GroupSpec] | GroupSpec,
                       scale_by_size: bool = True) -> Regularizer:
    """``l1_weight * ||w||_1 + group_weight * sum_g sqrt(|g|) ||w_g||_2`` over ``groups``."""
    groups = (groups,) if isinstance(groups, GroupSpec) else tuple(groups)
    return Regularizer(l1=l1_weight, group=group_weight, groups=groups,
                       scale_by_size=scale_by_size)


@dataclasses.dataclass(frozen=True)
class HalfSpace:
    """Use HSPG's half-space projection for the group term from ``start_step`` on."""

    start_step: int = 0
    epsilon: float = 0.0

    def __post_init__(self):
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) \
                or self.start_step < 0:
            raise ValueError(f"HalfSpace.start_step must be a non-negative int, got {self.start_step!r}")
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"HalfSpace.epsilon must be in [0, 1), got {self.epsilon!r}")


def soft_threshold(z: jax.Array, tau) -> jax.Array:
    """``sign(z) * max(|z| - tau, 0)``: the prox of ``tau * |.|`` (``tau`` may be per entry)."""
    return jnp.sign(z) * jnp.maximum(jnp.abs(z) - tau, 0.0)


def group_prox(z: jax.Array, ids: jax.Array, num_groups: int, tau: jax.Array,
               d: jax.Array | None = None, steps: int = 60) -> jax.Array:
    """``argmin_x 1/2 sum_i d_i (x_i - z_i)^2 + sum_g tau_g ||x_g||_2`` for flat ``z``.

    ``ids`` gives each entry's group (0..num_groups-1), ``tau`` is per group.
    With ``d=None`` (identity metric) it is closed form; otherwise ``steps``
    bisection steps on the group's multiplier (see the module docstring).
    """
    z = z.astype(jnp.float32)
    tau = jnp.asarray(tau, jnp.float32)

    def seg_sum(x):
        return jax.ops.segment_sum(x, ids, num_segments=num_groups)

    if d is None:
        norm = jnp.sqrt(seg_sum(z * z))
        scale = jnp.maximum(0.0, 1.0 - tau / jnp.maximum(norm, 1e-30))
        return z * scale[ids]
    d = d.astype(jnp.float32)
    dz = d * z
    a = jnp.sqrt(seg_sum(dz * dz))
    active = a > tau
    gap = jnp.where(active, a - tau, 1.0)
    d_min = jax.ops.segment_min(d, ids, num_segments=num_groups)
    d_max = jax.ops.segment_max(d, ids, num_segments=num_groups)
    safe_tau = jnp.maximum(tau, 1e-30)
    log_lo = jnp.log(safe_tau * d_min / gap)
    log_hi = jnp.log(safe_tau * d_max / gap)

    def residual(log_mu):
        mu = jnp.exp(log_mu)[ids]
        t = dz * mu / (d + mu)
        return jnp.sqrt(seg_sum(t * t)) - tau  # rises with mu

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = residual(mid) > 0
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    log_lo, log_hi = jax.lax.fori_loop(0, steps, body, (log_lo, log_hi))
    mu = jnp.exp(0.5 * (log_lo + log_hi))
    x = dz / (d + mu[ids])
    return jnp.where(active[ids] & (tau[ids] > 0), x, jnp.where(tau[ids] > 0, 0.0, z))


class _Plan(NamedTuple):
    """Static description of what the regulariser touches in a params tree."""

    treedef: Any
    l1_index: tuple[int, ...]
    group_index: tuple[int, ...]
    group_ids: Any  # np.int32 flat ids over the concatenated grouped leaves
    num_groups: int
    coeff: np.ndarray  # per-group c_g


def _plan(reg: Regularizer, params: Any) -> _Plan:
    treedef = jax.tree_util.tree_structure(params)
    if reg.groups:
        index: GroupIndex = resolve_groups(reg.groups, params)
        group_index = tuple(i for i, a in enumerate(index.ids) if a is not None)
        flat_ids = np.concatenate([index.ids[i].ravel() for i in group_index]) \
            if group_index else np.zeros(0, np.int32)
        # entries a group spec left out (-1) go to a dummy group with zero penalty
        dummy = index.num_groups
        flat_ids = np.where(flat_ids >= 0, flat_ids, dummy).astype(np.int32)
        coeff = np.sqrt(index.sizes) if reg.scale_by_size else np.ones(index.num_groups)
        coeff = np.concatenate([coeff, [0.0]]).astype(np.float32)
        l1_index = group_index
        return _Plan(treedef, l1_index, group_index, flat_ids, index.num_groups + 1, coeff)
    targets = _common.resolve_targets(params, None, reg.where)
    return _Plan(treedef, targets.index, (), np.zeros(0, np.int32), 0, np.zeros(0, np.float32))


def _apply_prox(reg: Regularizer, plan: _Plan, z: Any, w: Any, lr, d: Any | None,
                half_space, epsilon: float, steps: int) -> Any:
    z_leaves = plan.treedef.flatten_up_to(z)
    w_leaves = plan.treedef.flatten_up_to(w)
    d_leaves = None if d is None else plan.treedef.flatten_up_to(d)
    out = list(z_leaves)
    if reg.l1:
        for i in plan.l1_index:
            thr = lr * reg.l1 if d_leaves is None else lr * reg.l1 / d_leaves[i]
            out[i] = soft_threshold(out[i].astype(jnp.float32), thr).astype(z_leaves[i].dtype)
    if reg.group and plan.group_index:
        sizes = [z_leaves[i].size for i in plan.group_index]
        cat = lambda xs: jnp.concatenate([xs[i].ravel().astype(jnp.float32)  # noqa: E731
                                          for i in plan.group_index])
        zc = cat(out)
        dc = None if d_leaves is None else cat(d_leaves)
        ids = jnp.asarray(plan.group_ids)
        tau = lr * reg.group * jnp.asarray(plan.coeff)
        x = group_prox(zc, ids, plan.num_groups, tau, dc, steps)
        if half_space is not None:
            wc = cat(w_leaves)
            seg = lambda v: jax.ops.segment_sum(v, ids, plan.num_groups)  # noqa: E731
            w_norm = jnp.sqrt(seg(wc * wc))
            nonzero = w_norm > 0
            direction = wc / jnp.maximum(w_norm, 1e-30)[ids]
            trial = zc - tau[ids] * direction / (1.0 if dc is None else dc)
            inside = seg(trial * wc) >= epsilon * w_norm * w_norm
            keep = (nonzero & inside)[ids] | (tau[ids] == 0)
            hs = jnp.where(keep, jnp.where(tau[ids] == 0, zc, trial), 0.0)
            x = jnp.where(half_space, hs, x)
        start = 0
        for i, n in zip(plan.group_index, sizes):
            out[i] = x[start:start + n].reshape(z_leaves[i].shape).astype(z_leaves[i].dtype)
            start += n
    return jax.tree_util.tree_unflatten(plan.treedef, out)


def _lr_at(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _check_lr(learning_rate):
    if not callable(learning_rate) and isinstance(learning_rate, (int, float)) and learning_rate < 0:
        raise ValueError(f"learning_rate must be >= 0, got {learning_rate!r}")


def _check_reg(regularizer):
    if not isinstance(regularizer, Regularizer):
        raise TypeError(f"regularizer must be a Regularizer (l1, group_lasso, sparse_group_lasso), "
                        f"got {type(regularizer).__name__}")


class ProxSGDState(NamedTuple):
    """State of :func:`prox_sgd`: step count and the SGD (momentum) state."""

    count: jax.Array
    inner_state: Any


def prox_sgd(learning_rate, regularizer: Regularizer, *, momentum: float | None = None,
             nesterov: bool = False, half_space: HalfSpace | None = None,
             ) -> optax.GradientTransformationExtraArgs:
    """Proximal SGD: ``w' = prox_{lr R}(w - lr * g)`` (optionally with momentum).

    ``learning_rate`` is a float or an optax schedule. ``update`` needs params.
    """
    _check_reg(regularizer)
    _check_lr(learning_rate)
    inner = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)

    def init_fn(params):
        _plan(regularizer, params)  # surface group spec errors at init
        return ProxSGDState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None, **_):
        if params is None:
            raise ValueError("prox_sgd needs params: call update(grads, state, params)")
        plan = _plan(regularizer, params)
        u, inner_state = inner.update(updates, state.inner_state, params)
        z = _common.add_trees(params, u)
        hs = None if half_space is None else state.count >= half_space.start_step
        eps = 0.0 if half_space is None else half_space.epsilon
        new = _apply_prox(regularizer, plan, z, params, _lr_at(learning_rate, state.count), None,
                          hs, eps, 0)
        out = jax.tree.map(lambda a, b: (a - b).astype(b.dtype), new, params)
        return out, ProxSGDState(state.count + 1, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ProxAdamWState(NamedTuple):
    """State of :func:`prox_adamw`: step count, first and second moments."""

    count: jax.Array
    mu: Any
    nu: Any


def prox_adamw(learning_rate, regularizer: Regularizer, *, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 0.0, half_space: HalfSpace | None = None,
               bisection_steps: int = 60) -> optax.GradientTransformationExtraArgs:
    """AdamW whose iterate goes through the prox of ``regularizer`` in Adam's metric.

    ``z = w - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w)``, then
    ``w' = argmin_x 1/2 ||x - z||_D^2 + lr R(x)`` with ``D = sqrt(v_hat) + eps``.
    """
    _check_reg(regularizer)
    _check_lr(learning_rate)
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")

    def init_fn(params):
        _plan(regularizer, params)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return ProxAdamWState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None, **_):
        if params is None:
            raise ValueError("prox_adamw needs params: call update(grads, state, params)")
        plan = _plan(regularizer, params)
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                          state.nu, updates)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        d = jax.tree.map(lambda v: jnp.sqrt(v / c2) + eps, nu)
        lr = _lr_at(learning_rate, state.count)
        z = jax.tree.map(lambda p, m, dd: p.astype(jnp.float32) - lr * (m / c1 / dd
                                                                         + weight_decay * p),
                         params, mu, d)
        hs = None if half_space is None else state.count >= half_space.start_step
        hs_eps = 0.0 if half_space is None else half_space.epsilon
        new = _apply_prox(regularizer, plan, z, params, lr, d, hs, hs_eps, bisection_steps)
        out = jax.tree.map(lambda a, b: (a - b).astype(b.dtype), new, params)
        return out, ProxAdamWState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
