"""Which parameters a run trains: ``plan(..., trainable=)``, for fine-tuning a subset (LoRA adapters,
a new head) with the rest frozen.

A frozen parameter is read by the forward pass but never differentiated: it has no gradient, no
optimizer state and no gradient collective, so the plan, the estimate and the train step treat it
as model state (``Decision.trainable`` False).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax

from tpflax._src.errors import OptionError, RuleError
from tpflax._src.facts.tree import Leaf, is_box


def freeze(leaves: Sequence[Leaf], tree: Any, trainable: Any) -> list[Leaf]:
    """``leaves`` (as :func:`~tpflax._src.facts.tree.walk` gave them for ``tree``) with the parameters
    ``trainable`` does not select marked frozen.

    Args:
        trainable: None (every float parameter trains); a regex searched in each leaf's path
            (``r"lora"``); or an nnx filter (``nnx.LoRAParam``, a tuple of filters, ``nnx.Not(...)``,
            a callable ``(path, variable) -> bool``) applied to the tree's leaves as
            ``nnx.Optimizer(model, tx, wrt=...)`` applies it.

    Raises:
        RuleError: the regex does not compile.
        OptionError: it selects no parameter the optimizer could update.

    >>> import jax
    >>> from tpflax._src.facts.tree import walk
    >>> tree = {"w": jax.ShapeDtypeStruct((4, 4), "float32"), "lora": jax.ShapeDtypeStruct((4, 2), "float32")}
    >>> [(x.path, x.trainable) for x in freeze(walk(tree)[0], tree, "lora")]
    [('lora', True), ('w', False)]
    """
    if trainable is None:
        return list(leaves)
    selected = _selected(leaves, tree, trainable)
    out = [x if keep else dataclasses.replace(x, frozen=True) for x, keep in zip(leaves, selected, strict=True)]
    if not any(x.trainable for x in out):
        raise OptionError(f"trainable={trainable!r} selects none of the {len(out)} parameters' float leaves "
                          f"(e.g. {', '.join(x.path for x in out[:3])}); pass a regex found in the paths of "
                          "the parameters to train, or the nnx Variable type they are (nnx.LoRAParam)")
    return out


def _selected(leaves: Sequence[Leaf], tree: Any, trainable: Any) -> list[bool]:
    if isinstance(trainable, str):
        try:
            pattern = re.compile(trainable)
        except re.error as e:
            raise RuleError(f"trainable={trainable!r} is not a regex ({e}); pass e.g. trainable=r'lora'") from None
        return [bool(pattern.search(x.path)) for x in leaves]
    from flax.nnx import filterlib

    try:
        predicate = filterlib.to_predicate(trainable)
    except (TypeError, ValueError) as e:  # flax raises ValueError for an int ("Invalid format specifier")
        raise OptionError(f"trainable={trainable!r} is neither a regex nor an nnx filter ({e}); pass e.g. "
                          "trainable=r'lora' or trainable=nnx.LoRAParam") from None
    boxed = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
    out = []
    for path, x in boxed:
        keys = tuple(_key(k) for k in path)
        try:
            out.append(bool(predicate(keys, x)))
        except Exception as e:  # noqa: BLE001 - the caller's filter: a one-argument lambda was a bare TypeError
            raise OptionError(f"trainable={trainable!r} failed on leaf {'/'.join(map(str, keys))} "
                              f"({type(e).__name__}: {e}); a callable filter takes (path, value) as nnx filters do, "
                              "path a tuple of keys: e.g. trainable=lambda path, value: 'lora' in path, or pass a "
                              "regex (trainable=r'lora')") from e
    return out


def _key(k: Any) -> Any:
    """A jax path entry as nnx writes it in a path: the dict key, the index or the attribute name."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


__all__ = ["freeze"]
