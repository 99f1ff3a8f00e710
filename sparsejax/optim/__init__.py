"""optax transformations for sparse training.

* Proximal group-sparse optimizers: :func:`prox_sgd`, :func:`prox_adamw` with
  :func:`l1`, :func:`group_lasso`, :func:`sparse_group_lasso` over groups
  (:func:`output_channels`, :func:`input_neurons`, :func:`channels`,
  :func:`attention_heads`, :func:`blocks`, :func:`nm_groups`), optional
  :class:`HalfSpace` steps, and :func:`remove_zero_groups` to shrink shapes.
* Pruning: :func:`prune` with :func:`one_shot`, :func:`gradual`,
  :func:`iterative` schedules, uniform / ERK / global allocation; :func:`magnitude_masks`
  (one nested magnitude prune step, as iterative magnitude pruning's cycles take).
* Dynamic sparse training: :func:`sparse_evolutionary_training` (SET), :func:`rigl`.
* N:M training: :func:`srste`, :func:`progressive_nm`.
* Outer optimizers for training across processes: :mod:`sparsejax.optim.sparseloco`
  (SparseLoCo's compressor and error feedback, DiLoCo's and SparseLoCo's outer steps).

Masks have one owner at a time: ``sparsify``'s ``sstate`` holds fixed masks, the transform
that updates them holds moving ones; :func:`forward_masks` hands the forward pass the masks
of whichever owner holds them (see :mod:`sparsejax.optim.masking`). :func:`current_masks`
reads the optimizer's own masks.
"""

from sparsejax.optim.allocation import DISTRIBUTIONS, erk_ratios, layer_sparsities, masks_from_scores
from sparsejax.optim.dst import (DynamicSparseState, dynamic_sparse, random_masks, rigl,
                                 sparse_evolutionary_training)
from sparsejax.optim.groups import (GroupIndex, GroupSpec, attention_heads, blocks, channels,
                                    input_neurons, nm_groups, output_channels, resolve_groups)
from sparsejax.optim.masking import (apply_masks, current_masks, forward_masks, mask_layouts,
                                     masked_sparsity, owns_masks, soft_masks, sparsity_of)
from sparsejax.optim.nm_training import (NMState, current_mask_strength, progressive_nm,
                                         soft_mask_params, srste)
from sparsejax.optim.prosparse import prosparse_l1_schedule
from sparsejax.optim.prox import (HalfSpace, ProxAdamWState, ProxSGDState, Regularizer,
                                  group_lasso, group_prox, l1, prox_adamw, prox_sgd,
                                  soft_threshold, sparse_group_lasso)
from sparsejax.optim.pruning import SCORES, PruneState, magnitude_masks, prune
from sparsejax.optim.schedules import (SparsitySchedule, cosine_drop_fraction, exponential_decay,
                                       gradual, iterative, linear_decay, one_shot)
from sparsejax.optim.structure import remove_zero_groups
from sparsejax.optim import sparseloco

__all__ = [
    "DISTRIBUTIONS", "DynamicSparseState", "GroupIndex", "GroupSpec", "HalfSpace", "NMState",
    "ProxAdamWState", "ProxSGDState", "PruneState", "Regularizer", "SCORES", "SparsitySchedule",
    "apply_masks", "attention_heads", "blocks", "channels", "cosine_drop_fraction",
    "current_mask_strength", "current_masks", "dynamic_sparse", "erk_ratios",
    "exponential_decay", "forward_masks", "gradual", "group_lasso", "group_prox",
    "input_neurons", "iterative", "l1", "layer_sparsities", "linear_decay", "magnitude_masks",
    "mask_layouts",
    "masked_sparsity", "masks_from_scores", "nm_groups", "one_shot", "output_channels",
    "owns_masks", "progressive_nm", "prox_adamw", "prox_sgd", "prune", "random_masks",
    "remove_zero_groups", "resolve_groups", "rigl", "soft_mask_params", "soft_masks",
    "soft_threshold", "sparse_evolutionary_training", "sparse_group_lasso", "sparseloco",
    "sparsity_of", "srste",
]
__all__ += ["prosparse_l1_schedule"]
