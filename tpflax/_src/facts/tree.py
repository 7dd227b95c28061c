"""Walk a parameter tree: paths, shapes, dtypes and annotations of every leaf.

Accepts linen variable dicts and FrozenDicts, trees of arrays or
``jax.ShapeDtypeStruct``, trees boxed in flax metadata (``nn.Partitioned``,
``nn.LogicallyPartitioned``) and NNX state (``nnx.State`` of ``nnx.Variable``).
Nothing is allocated and the caller's tree is never modified.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from tpflax._src.errors import TreeError

# Collections a linen variable dict may hold at its top level.
COLLECTIONS = frozenset({"params", "batch_stats", "cache", "intermediates", "constants",
                         "losses", "aux_loss", "spectral", "perturbations"})


class once:
    """A property computed on first read and kept in the instance's ``__dict__`` (a frozen dataclass
    without slots): ``functools.cached_property`` without its lock, which costs more than the
    string and shape work it saves on the planner's many reads."""

    def __init__(self, fn) -> None:
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass(frozen=True)
class Leaf:
    """What the planner knows about one leaf before deciding anything.

    Attributes:
        path: ``"params/layers_0/mlp/up/kernel"`` (keystr, simple, ``/``-separated).
        shape: the leaf's shape.
        dtype: numpy dtype name (``"float32"``, ``"bfloat16"``, ``"key<fry>"``).
        itemsize: bytes per element (a fraction for sub-byte dtypes: int4 is 0.5).
        collection: linen collection (``"params"``, ``"batch_stats"``...) or ``""``.
        names: axis names from flax metadata, one per dim, or None.
        logical: True when ``names`` are logical (``LogicallyPartitioned``) rather
            than mesh axis names (``Partitioned``, NNX ``out_sharding``).
        numeric: "float", "int", "bool", "key" (PRNG key) or "complex".
        frozen: left out of training by the plan's ``trainable=`` filter (a LoRA base kernel).
        ignored: axis names from flax metadata that were dropped because they do not name one
            dim each (flax's lm1b/wmt examples annotate 3-D ``DenseGeneral`` kernels with two
            names), or None. The plan warns about them (:func:`tpflax._src.planner.plan.plan`).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    itemsize: int | float
    collection: str = ""
    names: tuple[Any, ...] | None = None
    logical: bool = False
    numeric: str = "float"
    frozen: bool = False
    ignored: tuple[Any, ...] | None = None

    @property
    def trainable(self) -> bool:
        """The optimizer updates it: a float parameter (not model state, not integer) not frozen."""
        return self.collection in ("", "params") and self.numeric in ("float", "complex") and not self.frozen

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.ceil(self.size * self.itemsize)  # sub-byte dtypes packed, as XLA stores them

    @once
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))


def keystr(path) -> str:
    """``jax.tree_util.keystr(path, simple=True, separator="/")``, with jax's own key types read
    directly (its per-key pattern match is most of a walk's time on a large tree).

    >>> keystr(jax.tree_util.tree_flatten_with_path({"a": [{"b": 1}]})[0][0][0])
    'a/0/b'
    """
    try:
        return "/".join([_SIMPLE[type(k)](k) for k in path])
    except KeyError:  # another key type: jax's own words
        return jax.tree_util.keystr(path, simple=True, separator="/")


_SIMPLE = {jax.tree_util.DictKey: lambda k: str(k.key), jax.tree_util.SequenceKey: lambda k: str(k.idx),
           jax.tree_util.GetAttrKey: lambda k: str(k.name), jax.tree_util.FlattenedIndexKey: lambda k: str(k.key)}


_BOXES: tuple[type, ...] | None = None


def _box_types() -> tuple[type, ...]:
    """flax's box types, once flax is loaded.

    A tree can hold flax boxes only if its owner imported flax, so tpflax does
    not import flax itself: ``import tpflax`` stays as light as jax.
    """
    global _BOXES
    if _BOXES is None and "flax" in sys.modules:
        from flax.core import meta

        types: list[type] = [meta.AxisMetadata]
        try:
            from flax import nnx

            types.append(nnx.Variable)
        except ImportError:  # pragma: no cover - flax without nnx
            pass
        _BOXES = tuple(types)
    return _BOXES or ()


def is_box(x: Any) -> bool:
    """True for flax metadata boxes (linen AxisMetadata, nnx.Variable)."""
    return isinstance(x, _box_types())


def _is_nnx_variable(x: Any) -> bool:
    boxes = _box_types()
    return len(boxes) > 1 and isinstance(x, boxes[1])


def is_nnx_state(tree: Any) -> bool:
    """True for an ``nnx.State`` (an nnx module's state, whose leaves may be Params or model state)."""
    return type(tree).__name__ == "State" and type(tree).__module__.startswith("flax.nnx")


def state_variable(x: Any) -> str:
    """The type of an nnx Variable that is model state, not a parameter (``BatchStat``, ``RngCount``,
    ``RngKey``, ...), or ``""`` (an ``nnx.Param``, a linen box or an array): the optimizer updates
    only parameters, so a plan marks such leaves untrainable.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> state_variable(nnx.BatchStat(jnp.ones(2))), state_variable(nnx.Param(jnp.ones(2)))
    ('BatchStat', '')
    """
    if not _is_nnx_variable(x):
        return ""
    from flax import nnx

    return "" if isinstance(x, nnx.Param) else type(x).__name__


def unbox(x: Any) -> Any:
    """The array inside a flax box (or ``x`` itself)."""
    if not is_box(x):
        return x
    if _is_nnx_variable(x):
        return x.get_value() if hasattr(x, "get_value") else x.value
    return x.value


def box_names(x: Any) -> tuple[tuple[Any, ...] | None, bool]:
    """(axis names, logical?) carried by a box, or (None, False)."""
    if not is_box(x):
        return None, False
    if _is_nnx_variable(x):
        md = x.get_metadata() if hasattr(x, "get_metadata") else {}
        for key in ("out_sharding", "sharding_names", "sharding"):
            names = md.get(key)
            if names is not None and not hasattr(names, "mesh"):
                return tuple(names), False
        return None, False
    names = getattr(x, "names", None)
    if names is None:
        return None, False
    import flax.linen as nn

    return tuple(names), isinstance(x, nn.LogicallyPartitioned)


def unboxed(tree: Any) -> Any:
    """The tree with every flax box replaced by the array inside it (a new tree)."""
    return jax.tree_util.tree_map(unbox, tree, is_leaf=is_box)


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    if isinstance(x, (str, bytes)):
        return None
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        try:
            return tuple(int(d) for d in x.shape), x.dtype
        except TypeError:
            return None
    if isinstance(x, (bool, np.bool_)):
        return (), np.dtype(bool)
    if isinstance(x, numbers.Number):  # a Python scalar: the dtype jax gives it (float32 unless jax_enable_x64)
        return (), jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)
    return None


def numeric_kind(dtype: Any) -> str:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return "key"
    if jax.dtypes.issubdtype(dtype, np.bool_):
        return "bool"
    if jax.dtypes.issubdtype(dtype, np.complexfloating):
        return "complex"
    if jax.dtypes.issubdtype(dtype, np.floating):
        return "float"
    return "int"


def _mixed_keys(tree: Any, path: str = "") -> str:
    """Where the first dict whose keys jax cannot sort is, and its keys' types (``"params/emb: int, str"``)."""
    if isinstance(tree, Mapping):
        kinds = sorted({type(k).__name__ for k in tree})
        if len(kinds) > 1:
            return f"{path or 'the root'} has keys of types {', '.join(kinds)}"
        for k, v in tree.items():
            if (found := _mixed_keys(v, f"{path}/{k}" if path else str(k))):
                return found
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            if (found := _mixed_keys(v, f"{path}/{i}" if path else str(i))):
                return found
    return ""


def walk(tree: Any) -> tuple[list[Leaf], Any]:
    """Describe every leaf of ``tree``.

    Returns:
        ``(leaves, treedef)`` where ``treedef`` treats flax boxes as leaves, so a
        list of per-leaf values in the same order unflattens into a tree shaped
        like the user's with each box replaced by its value.

    Raises:
        TreeError: the tree is empty or has leaves that are not arrays.

    >>> leaves, _ = walk({"params": {"w": jax.ShapeDtypeStruct((4, 8), "float32")}})
    >>> leaves[0].path, leaves[0].shape
    ('params/w', (4, 8))
    """
    try:
        boxed, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
    except ValueError as e:
        if "sorting pytree dictionary keys" not in str(e):
            raise
        where = _mixed_keys(tree) or "a dict in it has keys of several types"
        raise TreeError(f"jax cannot flatten the tree: {where}, which jax cannot sort; key each dict by one "
                        "type, e.g. str(k) for every key") from None
    if not boxed:
        raise TreeError(
            "the parameter tree is empty (no array leaves); pass the params returned by "
            "model.init(...), jax.eval_shape(model.init, ...), or nnx.state(model)")
    # linen variables are keyed by collection; an nnx module's state by attribute (a submodule named
    # "params" is no collection: its Variables' types say what is model state)
    top_keys = frozenset() if is_nnx_state(tree) else _top_keys(tree)
    is_collections = bool(top_keys) and ("params" in top_keys or top_keys <= COLLECTIONS)
    leaves, problems = [], []
    for path, x in boxed:
        p = keystr(path)
        box = is_box(x)
        names, logical = box_names(x) if box else (None, False)
        value = unbox(x) if box else x
        sd = _shape_dtype(value)
        if sd is None:
            problems.append(
                f"{p}: leaf of type {type(value).__name__} is not an array; parameter trees must hold "
                "arrays or jax.ShapeDtypeStruct (remove it, or keep it outside the tree you plan)")
            continue
        shape, dtype = sd
        non_numeric, name, size, numeric = _dtype_facts(dtype)
        if non_numeric:  # jax cannot hold these: catch them before device_put does
            problems.append(
                f"{p}: array of dtype {dtype} (shape {shape}) is not numeric; jax arrays hold numbers, "
                "bools or PRNG keys (drop the leaf, or encode it as numbers before planning)")
            continue
        ignored = None
        if names is not None and len(names) != len(shape):
            names, ignored = None, names  # malformed metadata: ignore it rather than guess (the plan warns)
        leaves.append(Leaf(
            path=p, shape=shape, dtype=name, itemsize=size,
            collection=p.split("/", 1)[0] if is_collections else (state_variable(x) if box else ""),
            names=names, logical=logical, numeric=numeric, ignored=ignored))
    if problems:
        raise TreeError("the parameter tree has leaves that are not arrays", problems)
    paths = [leaf.path for leaf in leaves]
    if len(set(paths)) != len(paths):
        dup = sorted({q for q in paths if paths.count(q) > 1})
        raise TreeError("two leaves print to the same path", [f"{q}: rename one of them" for q in dup])
    return leaves, treedef


def _dtype_facts(dtype: Any) -> tuple[bool, str | None, int | None, str | None]:
    """``(non-numeric, name, itemsize, numeric kind)`` of a leaf's dtype; the last three None for a
    non-numeric one. Cached by dtype: a model's leaves share a few dtypes."""
    try:
        return _cached_dtype_facts(dtype)
    except TypeError:  # an unhashable dtype-like: work it out each time
        return _dtype_facts_of(dtype)


def _dtype_facts_of(dtype: Any) -> tuple[bool, str | None, int | None, str | None]:
    if _non_numeric(dtype):
        return True, None, None, None
    return False, str(dtype), itemsize(dtype), numeric_kind(dtype)


_cached_dtype_facts = functools.lru_cache(maxsize=256)(_dtype_facts_of)


def _non_numeric(dtype: Any) -> bool:
    """True for object, string, bytes, structured and datetime dtypes (ml_dtypes' bf16/fp8 are numeric)."""
    try:
        return not any(jax.dtypes.issubdtype(dtype, t) for t in (np.number, np.bool_, jax.dtypes.prng_key))
    except TypeError:
        return False  # anything jax cannot even classify: leave it to jax's own message


def itemsize(dtype: Any) -> int | float:
    """Bytes per element of ``dtype``: a numpy/jax dtype, its name, or a typed PRNG key dtype.

    Sub-byte dtypes (int4, uint4, int2, float4) count a fraction of a byte: XLA packs
    them (``memory_analysis`` reports 32768 bytes for 65536 int4 elements, on CPU and
    TPU), though numpy's ``itemsize`` says 1. Multiply and round up (:func:`math.ceil`).

    A typed PRNG key holds its implementation's key data: ``key<fry>`` (threefry)
    is 2 uint32 = 8 bytes, ``key<rbg>`` and ``key<urbg>`` 4 uint32 = 16 bytes,
    as ``jax.random.key_data(key).nbytes`` says. Names work too, since plans
    store dtypes as strings.

    Raises:
        TypeError: ``dtype`` is not a dtype jax knows.

    >>> itemsize("bfloat16"), itemsize("key<fry>"), itemsize(jax.random.key(0).dtype), itemsize("int4")
    (2, 8, 8, 0.5)
    """
    if isinstance(dtype, str) and dtype.startswith("key<"):
        sizes = _key_itemsizes()
        if dtype not in sizes:
            raise TypeError(f"unknown PRNG key dtype {dtype!r}; known: {', '.join(sizes)}")
        return sizes[dtype]
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return int(dtype.itemsize)
    dt = jax.numpy.dtype(dtype)
    bits = jax.dtypes.itemsize_bits(dt)
    return bits / 8 if bits < 8 else int(np.dtype(dt).itemsize)


def narrower(cast: str, item: float) -> float:
    """Bytes per element of ``cast`` (a dtype name, "" for none) where narrower than ``item``, else 0: the width a
    leaf of ``item`` bytes that a model reads cast (a bfloat16 model's float32 kernels) moves its gradient in.

    >>> narrower("bfloat16", 4), narrower("float32", 2), narrower("", 4)
    (2, 0, 0)
    """
    size = itemsize(cast) if cast else 0
    return size if size < item else 0


@functools.cache
def key_kinds() -> dict[str, tuple[str, Any, jax.ShapeDtypeStruct]]:
    """``{"key<fry>": ("threefry2x32", the key dtype, one key's data), ...}`` for jax's PRNG
    implementations (abstract: nothing is allocated).

    >>> key_kinds()["key<fry>"][2].shape
    (2,)
    """
    out = {}
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        key = jax.eval_shape(lambda impl=impl: jax.random.key(0, impl=impl))
        out[str(key.dtype)] = (impl, key.dtype, jax.eval_shape(jax.random.key_data, key))
    return out


def _key_itemsizes() -> dict[str, int]:
    """``{"key<fry>": 8, ...}``."""
    return {name: int(kind[1].itemsize) for name, kind in key_kinds().items()}


def _top_keys(tree: Any) -> frozenset[str]:
    if hasattr(tree, "keys"):
        try:
            return frozenset(str(k) for k in tree.keys())
        except Exception:  # noqa: BLE001 - odd mapping types: no collections
            return frozenset()
    return frozenset()
