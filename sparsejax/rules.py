"""Rules: what to do to which parameters. A :class:`Recipe` is an ordered list of them.

Weight rules match parameter paths (see :mod:`sparsejax.paths`); for each leaf
that some matmul or conv consumes, the *first* matching rule wins. Rules are
plain frozen dataclasses: they validate their arguments when built and know the
sparsity math; the compiler (``sparsejax.compiler``) decides where they apply.

Mask rules compute boolean masks on the matrix view of a leaf (stacked layers
are masked per layer) and choose how gradients reach the dense weights:

* ``"masked"``: the forward uses ``w * mask`` and pruned weights get no
  gradient (the mask is frozen; the usual pruning setting);
* ``"ste"``: straight-through: the dense weight receives the gradient computed
  for the masked weight, so pruned weights keep learning and can come back;
* ``"srste"``: SR-STE (Zhou et al., 2021): straight-through plus a decay
  ``decay * (~mask * w)`` that pulls pruned weights towards zero.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import iso_flop
from sparsejax import masks as mask_math
from sparsejax import paths
from sparsejax.layout import WeightLayout

GRADIENT_MODES = ("masked", "ste", "srste")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class: a pattern over parameter paths."""

    pattern: str | re.Pattern

    def __post_init__(self):
        # NumPy and JAX scalars (np.float32(0.5), jnp.float32(0.5), np.int64(2)) are the same
        # numbers to a user: store them as Python numbers so every check and the report see one
        # type.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                fixed = tuple(_python_scalar(v) for v in value)
            else:
                fixed = _python_scalar(value)
            if fixed is not value:
                object.__setattr__(self, f.name, fixed)

    def matches(self, path: str) -> bool:
        return paths.matches(self.pattern, path)

    @property
    def name(self) -> str:
        return type(self).__name__

    def describe(self) -> str:
        """``Name(pattern, field=value, ...)``; keyword-only fields only where not default."""
        parts = [repr(self.pattern.pattern if isinstance(self.pattern, re.Pattern) else self.pattern)]
        for f in dataclasses.fields(self):
            if f.name == "pattern":
                continue
            value = getattr(self, f.name)
            if not f.kw_only or value != f.default:
                parts.append(f"{f.name}={value!r}")
        return f"{self.name}({', '.join(parts)})"

    def error(self, path: str, message: str) -> ValueError:
        return ValueError(f"{path}: {self.describe()}: {message}")


def _python_scalar(value: Any) -> Any:
    """A concrete NumPy / JAX scalar as the Python number it holds; anything else unchanged."""
    if isinstance(value, np.generic) and value.ndim == 0:
        return value.item()
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and value.ndim == 0:
        return value.item()
    return value


# --------------------------------------------------------------------------- masks


@dataclasses.dataclass(frozen=True)
class MaskRule(Rule):
    """A rule that keeps the dense weight and multiplies it by a boolean mask."""

    gradient: str = dataclasses.field(default="masked", kw_only=True)
    srste_decay: float = dataclasses.field(default=2e-4, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if self.gradient not in GRADIENT_MODES:
            raise ValueError(f"{self.describe()}: gradient must be one of {GRADIENT_MODES}")
        if self.srste_decay < 0:
            raise ValueError(f"{self.describe()}: srste_decay must be >= 0")

    def check_layout(self, path: str, layout: WeightLayout | None) -> None:
        """Raises when the leaf cannot carry this rule's structure."""

    def matrix_mask(self, matrix: jax.Array, key: jax.Array | None,
                    sparsity: float | jax.Array | None = None) -> jax.Array:
        """Mask for a ``(..., K, N)`` matrix view; ``sparsity`` overrides the rule's."""
        raise NotImplementedError

    def mask_for(self, path: str, leaf: jax.Array, layout: WeightLayout | None,
                 key: jax.Array | None = None, scores: jax.Array | None = None,
                 sparsity: float | jax.Array | None = None) -> jax.Array:
        """The boolean mask of a leaf (leaf-shaped).

        ``scores`` (leaf-shaped) replace the default score ``|leaf|``; ``layout`` None
        treats the whole leaf as one flat matrix (unstructured rules only).
        """
        self.check_layout(path, layout)
        scores = jnp.abs(leaf) if scores is None else scores
        if layout is None:
            flat = scores.reshape(1, -1)
            return self.matrix_mask(flat, key, sparsity).reshape(leaf.shape)
        return layout.from_matrix(self.matrix_mask(layout.to_matrix(scores), key, sparsity))

    @property
    def target_sparsity(self) -> float:
        raise NotImplementedError

    @property
    def needs_rng(self) -> bool:
        """Whether the masks are drawn at random (``init`` then requires an ``rng`` key)."""
        return False


def _require_layout(rule: Rule, path: str, layout: WeightLayout | None) -> WeightLayout:
    if layout is None:
        raise rule.error(path, "the leaf's axes mix the reduction and output dimensions, so "
                               "structured masks are undefined; use Prune instead")
    return layout


@dataclasses.dataclass(frozen=True)
class Prune(MaskRule):
    """Unstructured pruning to ``sparsity`` per matrix, by ``method`` "magnitude" or "random"."""

    sparsity: float = 0.5
    method: str = "magnitude"

    def __post_init__(self):
        super().__post_init__()
        mask_math.check_sparsity(self.sparsity, self.describe())
        if self.method not in ("magnitude", "random"):
            raise ValueError(f"{self.describe()}: method must be 'magnitude' or 'random'")

    def matrix_mask(self, matrix, key, sparsity=None):
        sparsity = self.sparsity if sparsity is None else sparsity
        if self.method == "random":
            if key is None:
                raise ValueError(f"{self.describe()}: method='random' needs a PRNG key at init")
            matrix = jax.random.uniform(key, matrix.shape)
        return mask_math.unstructured_mask(matrix, sparsity)

    @property
    def target_sparsity(self) -> float:
        return self.sparsity

    @property
    def needs_rng(self) -> bool:
        return self.method == "random"


@dataclasses.dataclass(frozen=True)
class NM(MaskRule):
    """N:M sparsity: ``n`` kept in every ``m`` consecutive weights along the reduction axis."""

    n: int = 2
    m: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n <= self.m):
            raise ValueError(f"{self.describe()}: N:M needs integers 0 < n <= m")

    def check_layout(self, path, layout):
        layout = _require_layout(self, path, layout)
        inner = layout.shape[layout.contract_axes[-1]]
        if inner % self.m:
            raise self.error(path, f"the reduction axis {layout.contract_axes[-1]} has size "
                                   f"{inner}, which m={self.m} does not divide")

    def matrix_mask(self, matrix, key, sparsity=None):
        return mask_math.nm_mask(matrix, self.n, self.m)

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m


@dataclasses.dataclass(frozen=True)
class Block(MaskRule):
    """Keeps whole ``block = (bk, bn)`` tiles of each ``(K, N)`` matrix, by tile magnitude."""

    sparsity: float = 0.5
    block: tuple[int, int] = (128, 128)

    def __post_init__(self):
        super().__post_init__()
        mask_math.check_sparsity(self.sparsity, self.describe())
        if len(self.block) != 2 or min(self.block) < 1:
            raise ValueError(f"{self.describe()}: block must be two positive sizes (bk, bn)")

    def check_layout(self, path, layout):
        layout = _require_layout(self, path, layout)
        bk, bn = self.block
        if layout.k % bk or layout.n % bn:
            raise self.error(path, f"block ({bk}, {bn}) does not divide the matrix "
                                   f"K×N = {layout.k}×{layout.n}")

    def matrix_mask(self, matrix, key, sparsity=None):
        sparsity = self.sparsity if sparsity is None else sparsity
        return mask_math.block_mask(matrix, sparsity, tuple(self.block))

    @property
    def target_sparsity(self) -> float:
        return self.sparsity


@dataclasses.dataclass(frozen=True)
class Channels(MaskRule):
    """Keeps whole output channels (``axis="out"``) or input neurons (``axis="in"``)."""

    sparsity: float = 0.5
    axis: str = "out"

    def __post_init__(self):
        super().__post_init__()
        mask_math.check_sparsity(self.sparsity, self.describe())
        if self.axis not in ("in", "out"):
            raise ValueError(f"{self.describe()}: axis must be 'in' or 'out'")

    def check_layout(self, path, layout):
        _require_layout(self, path, layout)

    def matrix_mask(self, matrix, key, sparsity=None):
        sparsity = self.sparsity if sparsity is None else sparsity
        return mask_math.channel_mask(matrix, sparsity, self.axis)

    @property
    def target_sparsity(self) -> float:
        return self.sparsity


# --------------------------------------------------------------------------- factorizations


@dataclasses.dataclass(frozen=True)
class Factorize(Rule):
    """A rule that replaces a dense weight by structured factors.

    ``init="project"`` starts from the Frobenius-closest factors of the given
    dense weight (dense -> sparse fine-tuning); ``init="random"`` draws fresh
    factors with a dense layer's output variance (training from scratch).
    """

    nblocks: int = 4
    init: str = dataclasses.field(default="project", kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks < 1:
            raise ValueError(f"{self.describe()}: nblocks must be an integer >= 1")
        if self.init not in ("project", "random"):
            raise ValueError(f"{self.describe()}: init must be 'project' or 'random'")

    def check_layout(self, path: str, layout: WeightLayout | None) -> WeightLayout:
        layout = _require_layout(self, path, layout)
        if layout.stack_axes != tuple(range(len(layout.stack_axes))):
            raise self.error(path, f"stacked axes {layout.stack_axes} must lead the leaf "
                                   "(as nn.scan lays them out) to hold factors per layer")
        if not 1 <= self.nblocks <= min(layout.k, layout.n):
            raise self.error(path, f"nblocks must satisfy 1 <= nblocks <= min(K, N) = "
                                   f"{min(layout.k, layout.n)} for the K×N = "
                                   f"{layout.k}×{layout.n} matrix")
        return layout


@dataclasses.dataclass(frozen=True)
class Monarch(Factorize):
    """Monarch factorization (Dao et al., 2022): two block-diagonal factors with a
    permutation between, laid out as fly's ``MonarchLinear(nblocks)``."""


@dataclasses.dataclass(frozen=True)
class BlockDiagonal(Factorize):
    """A single block-diagonal factor with ``nblocks`` blocks."""


# --------------------------------------------------------------------------- Sparse-IFT


@dataclasses.dataclass(frozen=True)
class SparseIsoFlop(Rule):
    """A Sparse Iso-FLOP Transformation (Saxena et al., 2023; :mod:`sparsejax.iso_flop`):
    the matched weights become a bigger sparse structure at ``sparsity`` with the dense
    layer's FLOPs counted at density. Weights and masks are drawn fresh at ``init``
    (random masks, variance matched to the dense leaf), so pass ``rng``."""

    sparsity: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        mask_math.check_sparsity(self.sparsity, self.describe())

    def check_layout(self, path: str, layout: WeightLayout | None) -> WeightLayout:
        layout = _require_layout(self, path, layout)
        if layout.stack_axes != tuple(range(len(layout.stack_axes))):
            raise self.error(path, f"stacked axes {layout.stack_axes} must lead the leaf "
                                   "(as nn.scan lays them out)")
        return layout

    @property
    def needs_rng(self) -> bool:
        return True

    @property
    def target_sparsity(self) -> float:
        return self.sparsity


@dataclasses.dataclass(frozen=True)
class SparseWide(SparseIsoFlop):
    """Sparse Wide: the FFN hidden width grows by ``1 / (1 - sparsity)`` (up, gate and down
    together, at the FFN site the compiler finds) and is trained at ``sparsity``.

    The pattern must match every weight of each FFN it touches; attention or other
    weights are refused. The hidden values between up/gate and down must be computed
    elementwise (no bias or per-unit scale over the hidden units).
    """

    def check_layout(self, path, layout):
        layout = super().check_layout(path, layout)
        if len(layout.contract_axes) != 1 or len(layout.free_axes) != 1:
            raise self.error(path, "needs a weight with one input and one output axis "
                                   f"(layout {layout.describe()})")
        return layout


@dataclasses.dataclass(frozen=True)
class SparseParallel(SparseIsoFlop):
    """Sparse Parallel: ``1 / (1 - sparsity)`` sparse ``(K, N)`` branches, summed."""

    def __post_init__(self):
        super().__post_init__()
        if not iso_flop.parallel_is_iso_flop(self.sparsity):
            raise ValueError(f"{self.describe()}: 1 / (1 - sparsity) = "
                             f"{1 / (1 - self.sparsity):.3g} branches is not a whole number; "
                             "use sparsity 0.5, 0.75, 0.875, ...")


@dataclasses.dataclass(frozen=True)
class SparseFactorized(SparseIsoFlop):
    """Sparse Factorized: ``W = U · V``, both sparse, at the rank that keeps the FLOPs."""


@dataclasses.dataclass(frozen=True)
class SparseDoped(SparseIsoFlop):
    """Sparse Doped: ``W = U · V + S``, a dense low-rank product plus a sparse residual."""


# --------------------------------------------------------------------------- activations


@dataclasses.dataclass(frozen=True)
class ActivationRule(Rule):
    """A rule over activation sites (found by program structure, not parameter paths).

    ``pattern`` selects sites by the weights around them: an FFN site matches when
    any of its up/gate/down weight paths does, an attention site when the path of
    a projection feeding its queries or keys does.
    """


@dataclasses.dataclass(frozen=True)
class SparkTopK(ActivationRule):
    """Spark's statistical top-k (You et al., 2025) on activations.

    ``site="ffn"``: on the gate pre-activation of each FFN, ``mode="soft"``
    (``max(z - θ, 0)``, then the model's own activation function) or ``"hard"``.
    ``site="attention"``: per query, keeps the top-k scores before the softmax
    and drops the rest; positions the model already masked stay masked.
    Exactly one of ``k`` (entries per row) and ``k_frac`` (fraction) is given;
    the default is ``k_frac=0.08`` for FFNs and ``k=256`` keys for attention.
    ``impl`` picks the top-k's implementation (see
    :func:`sparsejax.kernels.statistical_topk.statistical_topk`): ``"pallas"`` the
    one-pass kernel (for attention, one launch for the statistics over the unmasked
    scores and the selection); ``"auto"`` the faster of the kernel and XLA's top-k per
    site shape by :mod:`~sparsejax.kernels.path_choice` (the kernel where nothing is
    measured and it applies; program tuning also tries XLA's, which fuses with the ops
    around it); the default ``"xla"`` stays partitionable by XLA's sharding (a Pallas
    call is not), as multi-device training needs.
    """

    pattern: str | re.Pattern = "*"
    site: str = "ffn"
    k_frac: float | None = None
    k: int | None = None
    mode: str | None = dataclasses.field(default=None, kw_only=True)
    stop_gradient_threshold: bool = dataclasses.field(default=False, kw_only=True)
    impl: str = dataclasses.field(default="xla", kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if self.site not in ("ffn", "attention"):
            raise ValueError(f"{self.describe()}: site must be 'ffn' or 'attention'")
        if self.k is not None and self.k_frac is not None:
            raise ValueError(f"{self.describe()}: give k or k_frac, not both")
        if self.k_frac is not None and not 0.0 < float(self.k_frac) < 1.0:
            raise ValueError(f"{self.describe()}: k_frac must be in (0, 1)")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"{self.describe()}: k must be a positive integer")
        if self.mode not in (None, "soft", "hard"):
            raise ValueError(f"{self.describe()}: mode must be 'soft' or 'hard'")
        if self.impl not in ("xla", "pallas", "auto"):
            raise ValueError(f"{self.describe()}: impl must be 'xla', 'pallas' or 'auto', "
                             f"got {self.impl!r}")
        if self.site == "attention" and self.mode == "soft":
            raise ValueError(f"{self.describe()}: attention scores are kept or dropped "
                             "(mode='hard'), never shifted")

    @property
    def effective_mode(self) -> str:
        return self.mode or ("soft" if self.site == "ffn" else "hard")

    def k_args(self, width: int) -> dict:
        """``k``/``k_frac`` for a site of ``width`` entries per row."""
        if self.k is not None:
            return {"k": min(self.k, width - 1)} if width > 1 else {"k_frac": 0.5}
        if self.k_frac is not None:
            return {"k_frac": self.k_frac}
        if self.site == "ffn":
            return {"k_frac": 0.08}
        return {"k": min(256, width - 1)} if width > 1 else {"k_frac": 0.5}

    def kept_per_row(self, width: int) -> float:
        args = self.k_args(width)
        return float(args["k"]) if "k" in args else args["k_frac"] * width


# --------------------------------------------------------------------------- activation thresholds


def _no_heads():
    return paths.MatmulWeights(embeddings=False, head=False)


@dataclasses.dataclass(frozen=True)
class ActivationThreshold(ActivationRule):
    """Base of the calibrated magnitude thresholds: entries with ``|x| <= t`` become zero.

    ``t`` is calibrated from data (``sfn.calibrate``) so that a fraction ``sparsity`` of
    the site's entries falls below it, per site and per layer of a scanned stack; the
    thresholds live in ``sstate["thresholds"]``. Until calibrated every threshold is 0
    (entries that are exactly zero are dropped, nothing else).
    """

    sparsity: float = 0.5

    site = "threshold"     # never an FFN/attention top-k site: thresholds have their own plan

    def __post_init__(self):
        super().__post_init__()
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise ValueError(f"{self.describe()}: sparsity must be in [0, 1) (the fraction of "
                             f"activations set to zero), got {s!r}")


@dataclasses.dataclass(frozen=True)
class TEAL(ActivationThreshold):
    """TEAL (Liu et al., 2024): a threshold on the input of every linear layer it selects.

    ``pattern`` selects weights (default: every matmul weight but embeddings and output
    heads: q, k, v, o, gate, up, down); the activation entering each of their matmuls is
    thresholded to ``sparsity``. ``sfn.calibrate(..., global_sparsity=s)`` instead
    allocates sparsity across sites greedily under a global target, as TEAL does.
    """

    pattern: Any = dataclasses.field(default_factory=_no_heads)


@dataclasses.dataclass(frozen=True)
class CATS(ActivationThreshold):
    """CATS (Lee et al., 2024): a threshold on ``|act(gate)|`` in each gated FFN it selects
    (``pattern`` matches any of the FFN's up/gate/down weights). The hidden state
    ``act(gate) * up`` is then zero wherever the gate was cut, so the down projection's
    input has the same sparsity."""

    pattern: Any = "*"


@dataclasses.dataclass(frozen=True)
class CHESS(ActivationThreshold):
    """CHESS (He et al., 2024): channel-wise thresholds on the FFN activation, and
    selective thresholds in attention.

    FFN: entry ``i`` of ``act(gate)`` is dropped when ``|act(gate)_i| · E|up_i| <= t``:
    one threshold per layer on the product with the mean magnitude of the up branch
    channel it multiplies (calibrated), i.e. one threshold per channel on ``|act|``.
    Attention: the inputs of the projections ``attention`` selects get a threshold as
    :class:`TEAL` gives (default: the output projection ``o``; None: no attention site).
    """

    pattern: Any = "*"
    attention: Any = "re:.*/o(_proj)?/kernel$"


@dataclasses.dataclass(frozen=True)
class ReLUActivation(ActivationRule):
    """ProSparse's activation substitution: each selected FFN computes ``relu(gate)``
    instead of its own activation (``act(gate) * up`` becomes ``relu(gate) * up``).

    ``threshold`` > 0 is ProSparse's last stage (FATReLU, the shifted ReLU): entries at or
    below ``threshold`` are zero, those above keep their value. Combine with the L1 of the
    FFN activations (``sfn.with_aux``) and :func:`sparsejax.optim.prosparse_l1_schedule`.
    """

    pattern: Any = "*"
    threshold: float = 0.0
    site = "ffn"
    no_site_hint = ("ReLU substitution needs an FFN whose activation is computed entry by entry "
                    "(elementwise ops) between its up/gate and down matmuls")

    def __post_init__(self):
        super().__post_init__()
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise ValueError(f"{self.describe()}: threshold must be a number >= 0, got {t!r}")


# --------------------------------------------------------------------------- recipe


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An ordered tuple of rules; for each parameter the first matching weight rule wins."""

    rules: tuple[Rule, ...] = ()

    def __init__(self, rules: Sequence[Rule] = ()):
        rules = tuple(rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"Recipe takes Rule objects, got {r!r}")
        object.__setattr__(self, "rules", rules)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self):
        return len(self.rules)

    def describe(self) -> str:
        return "\n".join(r.describe() for r in self.rules) or "(empty recipe)"


def recipe_of(x: Any) -> Recipe:
    if isinstance(x, Recipe):
        return x
    if isinstance(x, Rule):
        return Recipe([x])
    if isinstance(x, (list, tuple)):
        return Recipe(x)
    raise TypeError(f"expected a Recipe, a Rule or a list of rules, got {type(x).__name__}")
