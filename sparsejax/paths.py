"""Parameter paths: the names rules match.

A leaf's path is its pytree key path joined by ``/``: ``params/Dense_0/kernel``
for Linen, ``layers/0/mlp/up/kernel`` for an NNX state (the trailing ``.value``
attribute of an NNX Variable is dropped, so both spell the same thing), ``w1``
for a plain dict. Patterns are globs (``*`` crosses ``/``), or regular
expressions written ``re:<regex>`` (matched in full).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any

import jax

__all__ = ["key_to_str", "path_str", "leaf_paths", "matches", "close_matches"]


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


def matches(pattern: str | re.Pattern, path: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(path) is not None
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def close_matches(pattern: str | re.Pattern, paths: list[str], n: int = 5) -> list[str]:
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    text = text[3:] if text.startswith("re:") else text
    plain = text.replace("*", "")
    return difflib.get_close_matches(plain, paths, n=n, cutoff=0.3)
