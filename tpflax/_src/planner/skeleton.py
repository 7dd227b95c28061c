"""The planned tree's containers in a plan's JSON, so ``Plan.from_json`` gives ``specs`` its shape back.

A plan's ``specs`` is shaped like the planned tree: lists stay lists, tuples
tuples, a ``FrozenDict`` a ``FrozenDict``, and empty subtrees stay. The JSON
lists decisions by path only, so the containers are written beside them as a
skeleton whose leaves are those paths:

* ``{"d": {key: node}}`` a dict, ``{"f": {...}}`` a flax ``FrozenDict``,
  ``{"s": {...}}`` an ``nnx.State``; when a key is an int (an ``nnx.List``'s
  layers, ``{0: ..., 1: ...}``) the body is ``[[key, node], ...]`` instead, as
  JSON object keys are strings and jax tells ``0`` from ``"0"``,
* ``{"l": [node, ...]}`` a list, ``{"t": [...]}`` a tuple, ``{"n": 0}`` None,
* a string: a leaf, by its path in ``decisions``.

Any other container (a custom pytree node) or a key that is neither a string
nor an int: no skeleton, and ``from_json`` falls back to nested dicts keyed by
path components, as plans written before the skeleton do (and as tpflax
versions that do not know a container read a skeleton that has it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import PartitionSpec

from tpflax._src.facts.tree import is_nnx_state

_MAPPINGS = ("d", "f", "s")  # dict, FrozenDict, nnx.State


class _Unwritable(Exception):
    """A container the skeleton does not describe."""


def skeleton(specs: Any, by_path: Mapping[str, PartitionSpec]) -> Any | None:
    """``specs``' containers with each leaf replaced by its path, or None.

    ``by_path``: each leaf's spec by path, in ``specs``' leaf order (a plan's
    decisions); a leaf whose spec differs from its path's gives None.

    >>> skeleton({"b": [PartitionSpec()], "a": (PartitionSpec(), None)}, {"a/0": PartitionSpec(), "b/0": PartitionSpec()})
    {'d': {'a': {'t': ['a/0', {'n': 0}]}, 'b': {'l': ['b/0']}}}
    """
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    paths = list(by_path)
    if len(leaves) != len(paths) or any(not is_spec(x) or x != by_path[p] for x, p in zip(leaves, paths, strict=True)):
        return None
    try:
        return _encode(jax.tree_util.tree_unflatten(treedef, list(paths)))
    except _Unwritable:
        return None


def _encode(node: Any) -> Any:
    if isinstance(node, str):
        return node
    if node is None:
        return {"n": 0}
    if type(node) is list or type(node) is tuple:
        return {"l" if type(node) is list else "t": [_encode(x) for x in node]}
    kind = _mapping_kind(node)
    if kind is None:
        raise _Unwritable
    items = _items(node)
    if any(not _writable_key(k) for k, _ in items):
        raise _Unwritable
    if all(isinstance(k, str) for k, _ in items):
        return {kind: {k: _encode(v) for k, v in items}}
    return {kind: [[k, _encode(v)] for k, v in items]}


def _mapping_kind(node: Any) -> str | None:
    if type(node) is dict:
        return "d"
    if type(node).__name__ == "FrozenDict":
        return "f"
    return "s" if is_nnx_state(node) else None


def _items(node: Any) -> list[tuple[Any, Any]]:
    """A mapping's (key, child) pairs as jax flattens it: an ``nnx.State`` holds plain dicts below
    its top level (indexing it would wrap them in States)."""
    if not is_nnx_state(node):
        return list(node.items())
    flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return [(path[0].key, child) for path, child in flat]


def _writable_key(key: Any) -> bool:
    return isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))


def rebuild(tree: Any, specs: Mapping[str, PartitionSpec]) -> Any | None:
    """The specs laid out on a skeleton (see :func:`skeleton`), or None if it does not list exactly
    the paths of ``specs`` or is malformed.

    >>> rebuild({"d": {"a": {"t": ["a/0", {"n": 0}]}}}, {"a/0": PartitionSpec("model")})
    {'a': (P('model',), None)}
    """
    seen: list[str] = []
    try:
        out = _decode(tree, specs, seen)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return out if sorted(seen) == sorted(specs) else None


def _decode(node: Any, specs: Mapping[str, PartitionSpec], seen: list[str]) -> Any:
    if isinstance(node, str):
        seen.append(node)
        return specs[node]
    (kind, body), = node.items()
    if kind == "n":
        return None
    if kind in ("l", "t"):
        items = [_decode(x, specs, seen) for x in body]
        return items if kind == "l" else tuple(items)
    if kind in _MAPPINGS:
        pairs = body.items() if isinstance(body, dict) else [(k, v) for k, v in body]
        d = {_key(k): _decode(v, specs, seen) for k, v in pairs}
        if kind == "f":
            from flax.core import FrozenDict

            return FrozenDict(d)
        if kind == "s":
            from flax import nnx

            return nnx.State(d)
        return d
    raise ValueError(kind)


def _key(key: Any) -> Any:
    if not _writable_key(key):
        raise ValueError(f"dict key {key!r}")
    return key


__all__ = ["rebuild", "skeleton"]
