"""What one abstract trace of a model yields, kept for the next caller that would trace it alike.

:func:`tpflax.estimate` traces its ``model=`` on every call (the dataflow, the layer calls), and so
does :func:`tpflax.plan` with ``model=``; a mesh suggestion, a benchmark sweep or a test suite calls
them many times on one model. :func:`cached` serves a result again when everything the trace reads
is the same:

* the model: the zoo model, linen module or plain function by identity (a weak reference where
  the object takes one, so a dropped model frees its entries), a linen module also by its repr (its
  fields' values: a mutable config edited in place traces afresh), an nnx module by its ``GraphDef``
  (its structure and static attributes: a module edited in place traces afresh); a plain function's
  captured state is not read, so one that changes what it computes needs :func:`clear`;
* the variable tree's structure (with any flax box metadata) and each leaf's shape and dtype;
* the sample inputs' structure, shapes and dtypes;
* jax's dtype settings (``jax_enable_x64``, ``jax_numpy_dtype_promotion``).

Values (array contents) are never read: the traces are abstract. A model whose key cannot be
formed (an unhashable leaf or tree metadata) is traced every time. The cache holds the last
:data:`SIZE` results; :func:`clear` empties it, :func:`info` counts its hits and misses.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["SIZE", "cached", "clear", "info", "model_key"]

SIZE = 64  # results kept (a few kinds per model and batch shape)

_lock = threading.Lock()
_entries: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()  # key -> (owner ref or None, value)
_counts = {"hits": 0, "misses": 0}
_dead: list[tuple] = []  # keys whose owner was freed, dropped at the next call under the lock


def _leaf(x: Any) -> tuple:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))
    return ("value", type(x), x)  # a Python scalar or a static leaf: its value


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(_leaf(x) for x in leaves)


def _source(m: Any) -> tuple[Any, Any]:
    """``(owner, identity)``: the object whose identity says which forward ``m`` runs (None: the
    identity is a value), and what stands for it in the key."""
    if m.zoo is not None:
        return m.zoo, ("zoo",)
    if m.graphdef is not None:
        return None, ("nnx", m.graphdef)
    if m.module is not None:  # its repr shows its fields' values: a config edited in place traces afresh
        return m.module, ("linen", repr(m.module))
    f = getattr(m.forward, "tpflax_wraps", m.forward)  # as_model's wrapper of a plain function
    if inspect.ismethod(f):  # a bound method is made anew at each attribute read: its instance and function
        return f.__self__, ("method", f.__func__)
    return f, ("callable",)


def model_key(m: Any) -> tuple[Any, tuple] | None:
    """``(owner, key)`` of a :class:`tpflax._src.model.Model`'s trace, or None when it cannot be keyed.

    >>> import jax
    >>> from tpflax._src.model import as_model
    >>> fn = lambda v, x: x @ v["w"]
    >>> s = jax.ShapeDtypeStruct
    >>> a = as_model(fn, (s((2, 4), "float32"),), {"w": s((4, 3), "float32")})
    >>> b = as_model(fn, (s((2, 4), "float32"),), {"w": s((4, 3), "float32")})
    >>> c = as_model(fn, (s((8, 4), "float32"),), {"w": s((4, 3), "float32")})
    >>> model_key(a)[1] == model_key(b)[1], model_key(a)[1] == model_key(c)[1]
    (True, False)
    """
    owner, ident = _source(m)
    try:
        key = (*ident, id(owner) if owner is not None else None, m.framework,
               tuple(sorted((k, repr(v)) for k, v in dict(m.kwargs).items())),
               _signature(m.variables), _signature(m.sample),
               bool(jax.config.jax_enable_x64), str(jax.config.jax_numpy_dtype_promotion))
        hash(key)
    except TypeError:  # unhashable metadata or leaf
        return None
    return owner, key


def _ref(owner: Any, key: tuple) -> Any:
    """A weak reference to ``owner`` that marks ``key``'s entry for dropping when the owner is freed; the
    owner itself (held by the bounded cache) when it takes no weak reference.

    The callback takes no lock: an owner can be freed while this thread holds it (an evicted or cleared
    entry that held the last reference to another entry's owner; the cycle collector, run by any
    allocation under the lock), and waiting there would never end."""
    def drop(_: Any) -> None:
        _dead.append(key)  # atomic; :func:`_purge` drops it under the lock

    try:
        return weakref.ref(owner, drop)
    except TypeError:
        return lambda: owner


def _purge() -> None:
    """Drop the entries whose owner was freed (call with the lock held)."""
    while _dead:
        key = _dead.pop()
        hit = _entries.get(key)
        if hit is not None and hit[0] is not None and hit[0]() is None:
            _entries.pop(key)


def cached(kind: str, m: Any, make: Callable[[], Any], extra: tuple = (), shared: tuple | None = None,
           free: Callable[[Any], bool] = lambda value: False) -> Any:
    """``make()``, or what it returned for an earlier ``m`` whose trace is the same (see the module
    docstring); ``kind`` names what is made and ``extra`` adds to the key whatever else it reads
    (hashable). A value ``free`` accepts did not depend on ``extra``: it is kept under ``shared`` too, which
    is looked up first (a trace under one mesh that nothing in it depends on serves every mesh).
    Exceptions are not kept: a failing trace fails again."""
    found = model_key(m)
    if found is None:
        return make()
    owner, base = found
    keys = [(kind, *base, shared)] if shared is not None else []
    key = (kind, *base, extra)
    with _lock:
        _purge()
        for k in (*keys, key):
            hit = _entries.get(k)
            if hit is not None and (hit[0] is None or hit[0]() is owner):
                _entries.move_to_end(k)
                _counts["hits"] += 1
                return hit[1]
        _counts["misses"] += 1
    value = make()
    with _lock:
        for k in (key, *(keys if free(value) else ())):
            _entries[k] = (_ref(owner, k) if owner is not None else None, value)
            _entries.move_to_end(k)
        while len(_entries) > SIZE:
            _entries.popitem(last=False)
    return value


def clear() -> None:
    """Forget every kept result (and the hit and miss counts)."""
    with _lock:
        _entries.clear()
        _dead.clear()
        _counts.update(hits=0, misses=0)


def info() -> dict[str, int]:
    """``{"hits", "misses", "size"}`` since the last :func:`clear`."""
    with _lock:
        _purge()
        return {**_counts, "size": len(_entries)}
