"""The one batch parser: every stage that needs a training batch's shapes reads it here.

A batch is a pytree of arrays / ``jax.ShapeDtypeStruct`` (a zoo model's
``make_batch``, or a model's sample inputs), a mapping of name to shape, a bare
shape, a ``"32x1024"`` string, or a batch size with a config that knows the
sequence length. :func:`parse_batch` turns each into a :class:`Batch`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tpflax._src.errors import EstimateError
from tpflax._src.facts.tree import itemsize
from tpflax._src.trace.batchflags import batch_leads


def np_dtype(name: Any):
    """``name`` as a numpy/jax dtype; a PRNG key's name as jax's key dtype; anything else as uint32.

    >>> str(np_dtype("bfloat16")), str(np_dtype("key<fry>"))
    ('bfloat16', 'key<fry>')
    """
    import jax
    import jax.numpy as jnp

    try:
        return jnp.dtype(name)
    except TypeError:
        if isinstance(name, str) and name.startswith("key<"):
            return jax.eval_shape(lambda: jax.random.key(0)).dtype
        return jnp.dtype("uint32")  # opaque leaves: a shape-only stand-in


def dtype_name(dtype: Any) -> str | None:
    """The canonical name of ``dtype`` (``"bfloat16"``), or None when jax does not know it.

    >>> import jax.numpy as jnp
    >>> dtype_name(jnp.bfloat16), dtype_name("nope")
    ('bfloat16', None)
    """
    if dtype is None:
        return None
    import jax.numpy as jnp

    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return None


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config[name]`` or ``config.name`` (a dict of hints or a model config), else ``default``.

    >>> config_value({"seq_len": 16}, "seq_len"), config_value(None, "vocab", 0)
    (16, 0)
    """
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


@dataclass(frozen=True)
class Batch:
    """A training batch's leaves, as ``(name, shape, dtype name)``, the activation dtype, and the batch size the
    user gave (``estimate(plan, tx, 8)``, as ``make_train_step(batch=8)`` is told; None: not given), which says
    which leaves hold the batch (:attr:`leads`)."""

    leaves: tuple[tuple[str, tuple[int, ...], str], ...]
    act_dtype: str
    given: int | None = None

    @property
    def leads(self) -> frozenset[int]:
        """The leaves' leading dims the step splits over the batch axes: every leaf's (a dual encoder's 8 images
        and 16 captions), a 1 aside; with :attr:`given`, only that size (the step keeps a leaf of another leading
        dim replicated): :func:`tpflax._src.trace.batchflags.batch_leads`.

        >>> b = Batch((("x", (8, 32), "float32"), ("pe", (16, 32), "float32")), "float32")
        >>> sorted(b.leads), sorted(Batch(b.leaves, b.act_dtype, given=8).leads)
        ([8, 16], [8])
        """
        return batch_leads((s for _, s, _ in self.leaves), self.given)

    @property
    def first_shape(self) -> tuple[int, ...]:
        """The shape of the first leaf that has dims (a model's inputs may start with a scalar); () if none."""
        return next((s for _, s, _ in self.leaves if s), ())

    @property
    def size(self) -> int:
        """The leading dim of :attr:`first_shape`."""
        return self.first_shape[0] if self.first_shape else 1

    def nbytes(self) -> int:
        return sum(math.prod(s) * itemsize(d) for _, s, d in self.leaves)

    def label(self) -> str:
        """``"32x1024"``: :attr:`first_shape`."""
        return "x".join(map(str, self.first_shape)) if self.first_shape else str(self.size)


def plain_batch(batch: Any) -> Any:
    """A batch given as numpy integers (``np.int64(8)``, ``(np.int64(8), 32)``, ``{"x": (np.int64(8), 32)}``)
    with Python ints in their place; anything else as given. Read as an array leaf, ``np.int64(8)`` was a batch
    of one example.

    >>> import numpy as np
    >>> plain_batch(np.int64(8)), plain_batch([np.int32(8), 32]), plain_batch({"x": (np.int64(8), 4), "dtype": "f"})
    (8, (8, 32), {'x': (8, 4), 'dtype': 'f'})
    """
    def whole(x: Any) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))

    def dims(x: Any) -> Any:
        return tuple(int(d) for d in x) if isinstance(x, (tuple, list)) and x and all(map(whole, x)) else x

    if whole(batch):
        return int(batch)
    if isinstance(batch, Mapping) and batch and all(isinstance(v, (tuple, list, str)) for v in batch.values()):
        return {k: dims(v) for k, v in batch.items()}
    return dims(batch)


def parse_batch(batch: Any, config: Any = None, act_dtype: str | None = None) -> Batch:
    """Normalise a batch description.

    Accepts a pytree of arrays / ``ShapeDtypeStruct`` (e.g.
    ``jax.eval_shape(lambda: model.make_batch(0, 32))`` or a model's sample
    inputs), a mapping of name to shape with an optional ``"dtype"`` entry
    (``{"x": (32, 1024), "dtype": "bfloat16"}``), a bare shape ``(32, 1024)``, a
    ``"32x1024"`` string, or a batch size when ``config`` has ``seq_len``. Token
    models (a config with ``vocab``) get int32 inputs and shifted int32 labels.

    Raises:
        EstimateError: the batch is missing or malformed.

    >>> parse_batch("8x16", {"vocab": 100}).leaves
    (('x', (8, 16), 'int32'), ('y', (8, 16), 'int32'))
    """
    dtype = act_dtype or dtype_name(config_value(config, "dtype")) or "float32"
    if batch is None:
        raise EstimateError("estimate needs a batch: e.g. batch={'x': (32, 1024)}, sample=(x,) with model=, "
                            "or jax.eval_shape(lambda: model.make_batch(0, 32))")
    batch = _as_shape(plain_batch(batch), config)
    if isinstance(batch, Mapping) and not batch:  # {} read as a shape mapping of no leaves: "global batch 1"
        raise EstimateError("the batch has no array leaves")
    if isinstance(batch, Mapping) and all(isinstance(v, (tuple, list, str)) or (k == "dtype" and isinstance(v, (type, np.dtype)))
                                          for k, v in batch.items()):  # "dtype": jnp.bfloat16 as well as its name
        return _from_shapes(dict(batch), config, act_dtype, dtype)
    _check_not_numbers(batch)
    b = _from_tree(batch, act_dtype, dtype)
    if b.size == 0:  # every figure would be the parameters' alone, the batch's collectives and activations 0
        name, shape, _ = next(leaf for leaf in b.leaves if leaf[1])
        raise EstimateError(f"the batch holds no examples: its leaf {name} has shape {shape}, a leading (batch) dim "
                            "of 0; pass the global batch the step trains on, e.g. 8 examples")
    return b


def size_problem(batch: Any) -> str | None:
    """Why ``batch``, given as a size (``8``) or a bare shape (``(8, 64)``), is no batch: a size or dim that is
    not a positive whole number; None for a good one and for any other kind of batch.

    >>> size_problem(8), size_problem((8, 64)), size_problem({"x": (8, 64)})
    (None, None, None)
    >>> size_problem(0)
    'batch=0 is not a positive whole number of examples; pass the global batch size, e.g. batch=8'
    >>> size_problem(True)
    'batch=True is not a positive whole number of examples; pass the global batch size, e.g. batch=8'
    >>> size_problem((8.5, 64))
    'batch=(8.5, 64) holds a dim that is not a positive whole number; pass a shape of positive ints, e.g. (8, 64)'
    """
    def number(x: Any) -> bool:  # a bool too: batch=True was read as one example
        return isinstance(x, numbers.Number) or type(x).__name__ == "bool_"

    def good(x: Any) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1

    if number(batch):
        return None if good(batch) else (f"batch={batch!r} is not a positive whole number of examples; pass the "
                                         "global batch size, e.g. batch=8")
    if isinstance(batch, (tuple, list)) and batch and all(map(number, batch)) and not all(map(good, batch)):
        return (f"batch={tuple(batch)!r} holds a dim that is not a positive whole number; pass a shape of "
                "positive ints, e.g. (8, 64)")
    return None


def shape_text(text: str) -> tuple[int, ...]:
    """A shape written ``"32x1024"`` (or ``"32*1024"``); ValueError when it is not one.

    >>> shape_text("8X64")
    (8, 64)
    """
    return tuple(int(x) for x in text.lower().replace("*", "x").split("x"))


def _as_shape(batch: Any, config: Any) -> Any:
    """A string or a bare size as a shape mapping; anything else unchanged."""
    if isinstance(batch, str):
        try:
            batch = shape_text(batch)
        except ValueError:
            raise EstimateError(f"batch {batch!r} is not NxM...; write e.g. '32x1024'") from None
    if isinstance(batch, int) and not isinstance(batch, bool):
        seq = config_value(config, "seq_len")
        if batch < 1:
            raise EstimateError(f"batch size {batch} must be >= 1")
        if seq is None:
            raise EstimateError(f"a bare batch size ({batch}) needs the model (for its sequence length); "
                                f"pass model=, or a shape such as ({batch}, 1024)")
        batch = (batch, int(seq))
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(x, int) for x in batch):
        batch = {"x": tuple(batch)}
    return batch


def _check_not_numbers(batch: Any) -> None:
    """EstimateError for a batch of plain numbers in containers, shapes written as anything but a name -> shape
    mapping (``((8, 64), (8,))``, ``{"x": (8, 64), "y": 8}``): each number was read as a 0-d array, "the global
    batch 1 does not divide"."""
    import jax

    leaves = jax.tree_util.tree_leaves(batch)
    if leaves and isinstance(batch, (Mapping, tuple, list)) and all(
            isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) for x in leaves):
        raise EstimateError(f"batch {batch!r} holds numbers, not shapes or arrays; write the inputs' shapes as a "
                            "mapping of name to shape, e.g. {'x': (8, 64), 'y': (8,)}, or a bare shape (8, 64)")


def _from_shapes(spec: dict, config: Any, act_dtype: str | None, dtype: str) -> Batch:
    vocab = config_value(config, "vocab")
    given = spec.pop("dtype", None)
    if given is not None and dtype_name(given) is None:  # "bf16" was numpy's bare TypeError further on
        raise EstimateError(f"batch['dtype'] = {given!r} is not a dtype jax knows; use e.g. 'bfloat16' or 'float32'")
    dtype = act_dtype or str(dtype_name(given) if given is not None else dtype)
    leaves = []
    for name, shape in spec.items():
        if not (isinstance(shape, (tuple, list)) and all(isinstance(s, int) and s > 0 for s in shape)):
            raise EstimateError(f"batch[{name!r}] = {shape!r} is not a shape of positive ints")
        shape = tuple(shape)
        leaf_dtype = "int32" if (vocab and len(shape) == 2) or name == "y" else dtype
        leaves.append((name, shape, leaf_dtype))
    if "y" not in spec and leaves:
        x_shape = Batch(tuple(leaves), dtype).first_shape
        y = x_shape if vocab and len(x_shape) == 2 else x_shape[:1]
        leaves.append(("y", y, "int32"))
    return Batch(tuple(leaves), dtype)


def _from_tree(batch: Any, act_dtype: str | None, dtype: str) -> Batch:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(batch)
    leaves = []
    for path, leaf in flat:
        shape = tuple(int(s) for s in getattr(leaf, "shape", ()))
        leaves.append((jax.tree_util.keystr(path, simple=True, separator="/") or "x", shape,
                       str(getattr(leaf, "dtype", "float32"))))
    if not leaves:
        raise EstimateError("the batch has no array leaves")
    floats = [d for _, _, d in leaves if dtype_name(d) and np_dtype(d).kind == "f"]
    return Batch(tuple(leaves), act_dtype or (floats[0] if floats else dtype))


def resolve_batch(batch: Any, zoo: Any = None) -> Any:
    """A zoo model's batch size (or ``(size, seq_len)``) as its real abstract batch (tokens and labels).

    Anything else is returned unchanged for :func:`parse_batch`.

    >>> from tpflax import zoo
    >>> sorted(resolve_batch(4, zoo.get("mlp")))
    ['x', 'y']
    """
    batch = plain_batch(batch)
    if zoo is None or not hasattr(zoo, "make_batch"):
        return batch
    dims = (batch,) if isinstance(batch, int) else tuple(batch) if isinstance(batch, (tuple, list)) else None
    seq = config_value(getattr(zoo, "config", None), "seq_len")
    if not dims or not all(isinstance(x, int) and not isinstance(x, bool) for x in dims):
        return batch
    if len(dims) == 1 or (seq is not None and len(dims) == 2 and dims[1] == seq):
        if dims[0] < 1:
            raise EstimateError(f"batch {batch!r} must be positive")
        import jax

        return jax.eval_shape(lambda: zoo.make_batch(0, dims[0]))
    return batch


def bare_shape(batch: Any) -> tuple[int, ...] | None:
    """``batch`` as a shape when it is one (``(8, 64)``, ``"8x64"``, a zoo batch ``{"x": (8, 64), ...}``),
    else None."""
    batch = plain_batch(batch)
    if isinstance(batch, Mapping) and "x" in batch:  # a zoo batch: its inputs' shape
        x = batch["x"]
        batch = tuple(x.shape) if hasattr(x, "shape") else x
    if isinstance(batch, str):
        try:
            batch = shape_text(batch)
        except ValueError:
            return None
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and all(isinstance(x, int) for x in batch):
        return tuple(batch)
    return None
