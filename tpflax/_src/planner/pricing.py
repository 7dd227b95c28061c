"""What plan() prices candidate layouts with: hardware, tokens per step, activation bytes, memory."""

from __future__ import annotations

from typing import Any

from tpflax._src.cost.activations import token_rows
from tpflax._src.cost.batch import parse_batch
from tpflax._src.cost.price import DEFAULT_TOKENS
from tpflax._src.errors import OptionError, TpflaxError
from tpflax._src.facts.tree import itemsize
from tpflax._src.hardware import DEFAULT_PLAN_HARDWARE, get_hardware, parse_bytes


def pricing(hardware: Any, batch: Any, device_memory: Any) -> dict[str, Any]:
    """The chooser's knobs for :class:`tpflax._src.planner.builders.Options`.

    ``batch`` (the global batch) sets the tokens per step and the activation
    dtype; without it, :data:`tpflax._src.cost.price.DEFAULT_TOKENS` float32
    tokens (a model's ``sample`` is a tracing example, not the training batch).

    >>> import jax
    >>> k = pricing(None, (jax.ShapeDtypeStruct((8, 16), "int32"),), "16GB")
    >>> k["hardware"].name, k["tokens"], k["act_item"], k["device_memory"]
    ('tpu-v5e', 128, 4, 16000000000)
    >>> pricing(None, None, None)["tokens"]
    8192
    """
    try:
        hw = get_hardware(hardware if hardware is not None else DEFAULT_PLAN_HARDWARE)
        memory = parse_bytes(device_memory) if device_memory is not None else None
    except TpflaxError as e:
        raise OptionError(f"plan(hardware={hardware!r}, device_memory={device_memory!r}): {e}") from None
    tokens, act_item = DEFAULT_TOKENS, 4
    if batch is not None:
        b = parse_batch(batch, None, None)
        tokens, act_item = max(1, token_rows(b, None)), itemsize(b.act_dtype)
    return {"hardware": hw, "tokens": int(tokens), "act_item": act_item, "device_memory": memory}
