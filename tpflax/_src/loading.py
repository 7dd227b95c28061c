"""Load a model for the CLI: a zoo name or a ``package.module:factory`` string."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from tpflax._src.errors import ModelLoadError


@dataclass(frozen=True)
class Loaded:
    """What the CLI needs about a model.

    Attributes:
        name: as given on the command line.
        variables: the variable tree (abstract when tpflax built it).
        model: the model, in any form :func:`tpflax._src.model.as_model` takes (a
            zoo model, a linen or nnx Module, a function ``fn(variables, *sample)``),
            or None for a bare tree (then it can be planned but not traced or run).
        sample: the model's example inputs (``ShapeDtypeStruct``), None for a zoo
            model (it has its own) or a bare tree.
    """

    name: str
    variables: Any
    model: Any = None
    sample: tuple[Any, ...] | None = None


def load_model(name: str, size: str | None = None) -> Loaded:
    """Resolve ``name`` to abstract variables (and the model when there is one), never allocating it.

    ``name`` is a zoo name (``gpt2-small``, ``llama``...) or ``package.module:factory``
    where ``factory()`` returns one of:

    * a ``tpflax.zoo`` model;
    * ``(linen_module, *sample)`` or ``(nnx_module, *sample)``, the sample inputs as
      arrays or ``jax.ShapeDtypeStruct`` (an nnx Module alone can be planned only);
    * ``(fn, variables, *sample)`` for a plain ``fn(variables, *sample)`` (a Hugging
      Face-style apply function);
    * a variable tree (plan and estimate only).

    >>> loaded = load_model("mlp")
    >>> loaded.model.name, loaded.sample is None
    ('mlp', True)
    """
    from tpflax import zoo

    if ":" not in name:
        if name not in zoo.names():
            raise ModelLoadError(
                f"unknown model {name!r}; use a zoo name ({', '.join(zoo.names())}) or "
                "'package.module:factory'")
        m = zoo.get(name, size=size)
        return Loaded(name, m.abstract_variables(), m)
    factory = load_callable(name, "model string", "a function that returns a model or a variable tree")
    try:
        made = factory()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{name}() raised {type(e).__name__}: {e}") from e
    return _loaded(name, made)


def load_callable(name: str, what: str, kind: str) -> Any:
    """The callable ``package.module:attr`` names, imported; a :class:`ModelLoadError` naming
    ``what`` (where the string came from) and ``kind`` (what it should name) otherwise.

    >>> load_callable("operator:add", "--loss", "a function")(1, 2)
    3
    """
    mod_name, sep, attr = name.partition(":")
    if not sep or not mod_name or not attr:
        raise ModelLoadError(f"{what} {name!r} must be package.module:name, naming {kind}")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's string
        raise ModelLoadError(f"cannot import {mod_name!r} from {what} {name!r}: "
                             f"{type(e).__name__}: {e}; check the module is on PYTHONPATH") from e
    found = getattr(module, attr, None)
    if found is None or not callable(found):
        raise ModelLoadError(f"{mod_name!r} has no callable {attr!r} (from {what} {name!r}); name {kind}")
    return found


def _loaded(name: str, made: Any) -> Loaded:
    from tpflax._src.model import as_model, is_linen, is_nnx, is_zoo

    if is_zoo(made):
        return Loaded(name, made.abstract_variables(), made)
    if is_linen(made):
        raise ModelLoadError(f"{name}() returned a linen Module without sample inputs; return "
                             "(module, jax.ShapeDtypeStruct(...), ...) so tpflax can init it abstractly")
    if is_nnx(made):
        return Loaded(name, as_model(made, ()).variables, made)
    head = made[0] if isinstance(made, tuple) and made else None
    try:
        if is_linen(head) or is_nnx(head):
            m = as_model(head, tuple(made[1:]))
            return Loaded(name, m.variables, head, m.sample)
        if callable(head) and len(made) >= 3:
            m = as_model(head, tuple(made[2:]), made[1])
            return Loaded(name, m.variables, head, m.sample)
    except Exception as e:  # noqa: BLE001 - the user's module failed to init on its sample
        nested = [i for i, x in enumerate(made[1:], 1) if isinstance(x, (tuple, list))]
        hint = (f"; item {nested[0]} is a {type(made[nested[0]]).__name__}: return the sample inputs unpacked, "
                "(module, x, ...), not (module, (x, ...))") if nested else ""
        raise ModelLoadError(f"{name}(): could not build the model from what it returned: "
                             f"{type(e).__name__}: {e}{hint}") from e
    if callable(head):
        raise ModelLoadError(f"{name}() returned ({type(head).__name__}, ...) with {len(made) - 1} more "
                             "item(s); return (fn, variables, *sample) for a function fn(variables, *sample)")
    if _only_numbers(made):
        raise ModelLoadError(f"{name}() returned {_short(made)}, which is neither a model nor a variable tree "
                             "(no array or jax.ShapeDtypeStruct leaf); return a zoo model, (module, *sample), "
                             "(fn, variables, *sample) or the variables")
    return Loaded(name, made)


def _only_numbers(tree: Any) -> bool:
    """True for a tree with no leaf but Python numbers, or none at all (``None``, ``{}``, ``5``): the planner
    takes a number as a parameter, so such a tree would be planned as one, not refused. Other leaves
    (strings, objects) are left to the planner's own error, which names each."""
    import jax

    return all(isinstance(x, (bool, int, float, complex)) for x in jax.tree.leaves(tree))


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
