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
        variables: the variable tree (abstract when it came from the zoo).
        model: the :class:`tpflax.zoo.ZooModel`, when there is one (needed for
            dry runs and tracing); None for a bare tree.
    """

    name: str
    variables: Any
    model: Any = None


def load_model(name: str, size: str | None = None) -> Loaded:
    """Resolve ``name`` to abstract variables, never allocating the model.

    ``name`` is a zoo name (``gpt2-small``, ``llama``...) or
    ``package.module:factory`` where ``factory()`` returns a ZooModel, a
    ``(linen module, *sample inputs)`` tuple, an ``nnx.Module``, or a variable tree.
    """
    from tpflax import zoo

    if ":" not in name:
        if name not in zoo.names():
            raise ModelLoadError(
                f"unknown model {name!r}; use a zoo name ({', '.join(zoo.names())}) or "
                "'package.module:factory'")
        m = zoo.get(name, size=size)
        return Loaded(name, m.abstract_variables(), m)
    mod_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's model string
        raise ModelLoadError(f"cannot import {mod_name!r} from model string {name!r}: "
                             f"{type(e).__name__}: {e}; check the module is on PYTHONPATH") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{mod_name!r} has no callable {attr!r} (from model string {name!r}); "
                             "name a function that returns a model or a variable tree")
    try:
        made = factory()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{name}() raised {type(e).__name__}: {e}") from e
    return Loaded(name, *_to_variables(made, name))


def _to_variables(made: Any, name: str) -> tuple[Any, Any]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from tpflax.zoo import ZooModel

    if isinstance(made, ZooModel):
        return made.abstract_variables(), made
    if isinstance(made, tuple) and made and isinstance(made[0], nn.Module):
        module, *sample = made

        def init(rng):
            return module.init(rng, *[jnp.zeros(s.shape, s.dtype) for s in sample])

        return jax.eval_shape(init, jax.random.key(0)), None
    if isinstance(made, nn.Module):
        raise ModelLoadError(f"{name}() returned a linen Module without sample inputs; return "
                             "(module, jax.ShapeDtypeStruct(...), ...) so tpflax can init it abstractly")
    try:
        from flax import nnx

        if isinstance(made, nnx.Module):
            return nnx.state(made), None
    except ImportError:  # pragma: no cover
        pass
    return made, None
