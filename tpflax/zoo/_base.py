"""The `ZooModel` record shared by every family in the zoo.

A `ZooModel` bundles a Flax model (linen or NNX) with everything a planner, an
estimator or a test needs to drive it: abstract variables (no allocation),
concrete init, sample input specs, a batch maker and a pure loss.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Config defaults. Kept as module constants so configs stay hashable.
F32 = jnp.float32


def xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels, computed in float32."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def token_batch(rng: jax.Array, batch: int, seq_len: int, vocab: int) -> dict[str, jax.Array]:
    """A next-token batch: `x` is tokens[:, :-1], `y` the same tokens shifted by one."""
    tokens = jax.random.randint(rng, (batch, seq_len + 1), 0, vocab, dtype=jnp.int32)
    return {"x": tokens[:, :-1], "y": tokens[:, 1:]}


def image_batch(
    rng: jax.Array, batch: int, image: int, channels: int, classes: int, dtype: Any = F32
) -> dict[str, jax.Array]:
    """An NHWC image batch with integer class labels."""
    kx, ky = jax.random.split(rng)
    x = jax.random.normal(kx, (batch, image, image, channels), dtype)
    y = jax.random.randint(ky, (batch,), 0, classes, dtype=jnp.int32)
    return {"x": x, "y": y}


def _as_key(rng: Any) -> jax.Array:
    """Accept an int seed, a typed key or a raw uint32 key."""
    if isinstance(rng, int):
        return jax.random.key(rng)
    return rng


@dataclasses.dataclass(frozen=True, eq=False)
class ZooModel:
    """One model of the zoo: a Flax module plus the functions to drive it.

    Attributes:
      name: registered name (``"gpt2"``, ``"llama-2-7b"``, ...).
      family: model family (``"gpt2"``, ``"llama"``, ...).
      size: ``"tiny"`` (runs on CPU in tests) or ``"real"`` (abstract use only).
      framework: ``"linen"`` or ``"nnx"``.
      config: frozen dataclass of the model sizes.
      module: linen: the ``nn.Module``; nnx: a factory ``rngs -> nnx.Module``.
      input_specs: ``batch -> tuple[jax.ShapeDtypeStruct, ...]`` of forward inputs.
      batch_fn: ``(rng, batch) -> {"x": ..., "y": ...}`` concrete batch.
      apply_kwargs: extra keyword arguments for the forward pass (e.g.
        ``{"train": False}`` so BatchNorm uses its running averages).

    Example:
      >>> from tpflax import zoo
      >>> m = zoo.get("mlp")
      >>> v = m.abstract_variables()
      >>> v["params"]["head"]["kernel"].shape
      (64, 10)
    """

    name: str
    family: str
    size: str
    framework: str
    config: Any
    module: Any
    input_specs: Callable[[int], tuple[jax.ShapeDtypeStruct, ...]]
    batch_fn: Callable[[jax.Array, int], dict[str, jax.Array]]
    apply_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"ZooModel(name={self.name!r}, family={self.family!r}, size={self.size!r}, "
            f"framework={self.framework!r}, config={self.config!r})"
        )

    # -- inputs ---------------------------------------------------------------

    def sample_inputs(self, batch: int = 2) -> tuple[jax.ShapeDtypeStruct, ...]:
        """Shape/dtype specs of the forward-pass inputs for a batch of ``batch``."""
        return tuple(self.input_specs(batch))

    def make_batch(self, rng: Any, batch: int = 2) -> dict[str, jax.Array]:
        """A concrete ``{"x": inputs, "y": integer labels}`` batch for :meth:`loss`."""
        return self.batch_fn(_as_key(rng), batch)

    # -- variables ------------------------------------------------------------

    def _init_fn(self) -> Callable[[jax.Array], Any]:
        specs = self.sample_inputs(batch=1)
        if self.framework == "nnx":
            from flax import nnx

            def init(rng):
                return nnx.state(self.module(nnx.Rngs(params=rng)))

            return init

        def init(rng):
            dummies = [jnp.zeros(s.shape, s.dtype) for s in specs]
            return self.module.init(rng, *dummies, **self.apply_kwargs)

        return init

    def abstract_variables(self) -> Any:
        """The full variable tree as ``jax.ShapeDtypeStruct`` leaves.

        Uses ``jax.eval_shape`` only, so it never allocates and works for 405B.
        Linen: ``{"params": ..., ["batch_stats": ...]}``; nnx: an ``nnx.State``.
        """
        # Traced once per model (estimate, trace and suggest all ask); a fresh tree each call, so
        # a caller that edits its copy never changes what the next caller gets.
        return jax.tree_util.tree_map(lambda x: x, self._abstract)

    @functools.cached_property
    def _abstract(self) -> Any:
        return jax.eval_shape(self._init_fn(), jax.random.key(0))

    @functools.cached_property
    def _jitted_init(self) -> Callable[[jax.Array], Any]:
        return jax.jit(self._init_fn())

    def init(self, rng: Any) -> Any:
        """Concrete variables (linen: ``module.init`` dict; nnx: ``nnx.state(model)``)."""
        return self._jitted_init(_as_key(rng))

    # -- nnx helpers ----------------------------------------------------------

    @functools.cached_property
    def graphdef(self) -> Any:
        """nnx only: the model's GraphDef (computed abstractly, no allocation)."""
        if self.framework != "nnx":
            raise AttributeError(f"{self.name} is a linen model; graphdef is nnx-only")
        from flax import nnx

        abstract = nnx.eval_shape(lambda: self.module(nnx.Rngs(params=0)))
        return nnx.graphdef(abstract)

    def make_model(self, rng: Any = 0) -> Any:
        """nnx only: a concrete ``nnx.Module`` built from ``rng``."""
        if self.framework != "nnx":
            raise AttributeError(f"{self.name} is a linen model; use .module / .init")
        from flax import nnx

        return self.module(nnx.Rngs(params=_as_key(rng)))

    # -- forward and loss -----------------------------------------------------

    def apply(self, variables: Any, *inputs: jax.Array, **kwargs: Any) -> Any:
        """Forward pass returning logits (eval mode for BatchNorm).

        ``kwargs`` override :attr:`apply_kwargs` and, for linen, reach
        ``module.apply`` too: ``m.apply(v, x, train=True, mutable=["batch_stats"])``.
        """
        kwargs = {**self.apply_kwargs, **kwargs}
        if self.framework == "nnx":
            from flax import nnx

            model = nnx.merge(self.graphdef, variables)
            return model(*inputs, **kwargs)
        return self.module.apply(variables, *inputs, **kwargs)

    def loss(self, variables: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Scalar float32 cross-entropy; a pure function of ``(variables, batch)``."""
        return xent(self.apply(variables, batch["x"]), batch["y"])

    def param_count(self) -> int:
        """Number of parameters (``params`` collection / ``nnx.Param``), abstractly."""
        return count_params(self.abstract_variables(), self.framework)


def params_of(variables: Any, framework: str = "linen") -> Any:
    """The trainable part of a variable tree: ``variables["params"]`` or nnx Params."""
    if framework == "nnx":
        from flax import nnx

        return nnx.filter_state(variables, nnx.Param)
    return variables["params"]


def count_params(variables: Any, framework: str = "linen") -> int:
    """Total element count of the trainable leaves of ``variables``."""
    leaves = jax.tree_util.tree_leaves(params_of(variables, framework))
    total = 0
    for leaf in leaves:
        size = 1
        for d in leaf.shape:
            size *= int(d)
        total += size
    return total
