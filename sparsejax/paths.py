"""Parameter paths: the names rules match.

A leaf's path is its pytree key path joined by ``/``: ``params/Dense_0/kernel``
for Linen, ``layers/0/mlp/up/kernel`` for an NNX state (the trailing ``.value``
attribute of an NNX Variable is dropped, so both spell the same thing), ``w1``
for a plain dict. Patterns are globs (``*`` crosses ``/``), or regular
expressions written ``re:<regex>`` (matched in full). :class:`MatmulWeights`
selects by what a weight does instead (every matmul / einsum / conv weight).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any

import jax

__all__ = ["key_to_str", "path_str", "leaf_paths", "matches", "close_matches", "MatmulWeights"]


def key_to_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path: tuple[Any, ...]) -> str:
    parts = [key_to_str(k) for k in key_path]
    # An NNX Variable flattens to its `.value`; the variable itself is the parameter.
    if len(key_path) > 1 and isinstance(key_path[-1], jax.tree_util.GetAttrKey) \
            and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
    """The path string of every leaf of ``tree``, in flattening order."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(kp) for kp, _ in with_path]


def matches(pattern: Any, path: str) -> bool:
    if isinstance(pattern, MatmulWeights):
        return pattern.matches(path)
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(path) is not None
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def close_matches(pattern: Any, paths: list[str], n: int = 5) -> list[str]:
    if isinstance(pattern, MatmulWeights):
        pattern = pattern.within
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    text = text[3:] if text.startswith("re:") else text
    plain = text.replace("*", "")
    return difflib.get_close_matches(plain, paths, n=n, cutoff=0.3)


class MatmulWeights:
    """Selects parameters by what they do, not by name: every weight a matmul, an einsum
    or a conv multiplies by (found by ``sparsify`` in the traced program).

    Use it in place of a rule's pattern: ``NM(MatmulWeights(head=False), n=2, m=4)``.

    Args:
      embeddings: include weights also read by a lookup (token embedding tables,
        tied or not).
      head: include output heads: weights whose matmul produces a value that reaches
        the function's outputs with no other matmul in between.
      within: a path pattern (glob or ``re:``) the weights must also match.

    Outside ``sparsify`` (e.g. ``sparsejax.optim`` groups) only ``within`` applies.
    """

    def __init__(self, embeddings: bool = True, head: bool = True, within: str = "*"):
        self.embeddings, self.head, self.within = bool(embeddings), bool(head), within

    def matches(self, path: str) -> bool:
        return matches(self.within, path)

    def selects(self, path: str, roles: frozenset[str] | set[str]) -> bool:
        """Whether a leaf with these roles (see ``sparsejax.compiler.weight_roles``) is selected."""
        return ("matmul" in roles and self.matches(path)
                and (self.embeddings or "embedding" not in roles)
                and (self.head or "head" not in roles))

    def _key(self):
        return (self.embeddings, self.head, self.within)

    def __eq__(self, other):
        return isinstance(other, MatmulWeights) and self._key() == other._key()

    def __hash__(self):
        return hash(("MatmulWeights", self._key()))

    def __repr__(self):
        args = [f"{k}=False" for k in ("embeddings", "head") if not getattr(self, k)]
        args += [f"within={self.within!r}"] if self.within != "*" else []
        return f"MatmulWeights({', '.join(args)})"
