"""Key paths as '/'-joined strings, and regex/predicate selectors over them."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import jax

Selector = Union[str, Sequence[str], Callable[[str, Any], bool], None]


def key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_str(path) -> str:
    """'/'-joined path, dropping the `.value` hop of NNX Variables so paths read like Linen's."""
    parts = [key_name(e) for e in path]
    if parts and parts[-1] in ("value", "raw_value"):
        parts = parts[:-1]
    return "/".join(parts)


def compile_selector(selector: Selector, what: str) -> Callable[[str, Any], bool]:
    """A predicate(path, leaf) from a regex, a list of regexes, or a predicate.

    Regexes are matched with `re.search` against the '/'-joined path.
    """
    if selector is None:
        return lambda path, leaf: False
    if callable(selector):
        return selector
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what} must be a regex, a list of regexes or a predicate(path, leaf); "
                        f"got {selector!r}")
    compiled = [re.compile(p) for p in patterns]
    return lambda path, leaf: any(c.search(path) for c in compiled)


def lookup_pattern(patterns: dict | None, path: str, default):
    """The value for `path` in `patterns`: its exact key if present, else the first regex that
    matches it (`re.search`, as PEFT's rank/alpha_pattern).

    Exact keys come first so that a dict of whole paths (what `lora_jax.layout_of` returns) means
    what it says even when a path holds regex characters or is a substring of another path."""
    patterns = patterns or {}
    if path in patterns:
        return patterns[path]
    for pattern, value in patterns.items():
        if re.search(pattern, path):
            return value
    return default


def flatten_with_paths(tree, is_leaf=None):
    leaves, treedef = jax.tree.flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in leaves], treedef
