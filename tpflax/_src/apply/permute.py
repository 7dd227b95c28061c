"""Reorder a sharded array along one dim by pure data movement, bit for bit.

A ``jnp.take`` of an operand split on the gathered dim is partitioned by XLA
as a masked gather on every shard and an all-reduce (sum) of the results:
``-0.0 + 0.0`` is ``+0.0``, so the sign of a zero (and any value added to a
masked zero) is not what was stored. :func:`permute` instead sends each
device the elements its output shard needs with one ``all_to_all`` inside a
``shard_map`` and gathers locally on both sides: no collective adds, no
arithmetic touches the values. Each device holds at most ``n`` times the
largest piece it sends to one device (at most the whole dim, what an
all-gather would hold), and a multi-host job moves only its own shards.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding


def split_axes(sharding: Any, dim: int) -> tuple[str, ...]:
    """The mesh axes splitting ``dim`` under ``sharding`` (jax splits evenly); () when it is whole on each device.

    >>> from jax.sharding import AbstractMesh, PartitionSpec
    >>> s = NamedSharding(AbstractMesh((2, 4), ("data", "model")), PartitionSpec(None, ("data", "model")))
    >>> split_axes(s, 1), split_axes(s, 0), split_axes(s, 2)
    (('data', 'model'), (), ())
    """
    if not isinstance(sharding, NamedSharding) or dim >= len(sharding.spec) or sharding.spec[dim] is None:
        return ()
    entry = sharding.spec[dim]
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    return axes if math.prod(sharding.mesh.shape[a] for a in axes) > 1 else ()


def tables(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(send, recv)`` for ``out[i] = x[index[i]]`` over ``n`` contiguous shards of ``len(index)``.

    ``send[k]`` lists, ``c`` per destination (padded), the local positions shard ``k`` sends to each
    shard in turn; ``recv[k]`` picks shard ``k``'s output from what it received, laid out by sender.

    >>> send, recv = tables(np.array([0, 2, 1, 3]), 2)  # shard 0 sends x[0] to 0, x[1] to 1; shard 1 x[2], x[3]
    >>> send.tolist(), recv.tolist()
    ([[0, 1], [0, 1]], [[0, 1], [0, 1]])
    """
    width = len(index) // n
    owner, offset = np.divmod(np.asarray(index), width)
    dest = np.arange(len(index)) // width
    pair = owner * n + dest  # (sender, receiver) of each output element
    counts = np.bincount(pair, minlength=n * n)
    by_pair = np.argsort(pair, kind="stable")  # each pair's elements in output order
    slot = np.empty_like(pair)
    slot[by_pair] = np.arange(len(index)) - (np.cumsum(counts) - counts)[pair[by_pair]]
    c = max(1, int(counts.max()))
    send = np.zeros((n, n, c), np.int32)
    send[owner, dest, slot] = offset
    recv = (owner * c + slot).reshape(n, width).astype(np.int32)
    return send.reshape(n, n * c), recv


def permute(x: Any, index: np.ndarray, dim: int, sharding: Any) -> Any:
    """``x`` (laid out as ``sharding``, Auto or Explicit axes) taken at ``index`` along ``dim``, laid out
    alike; traceable. Bit-exact for every value: -0.0 and NaN payloads too.

    >>> import tpflax
    >>> from jax.sharding import PartitionSpec
    >>> mesh = tpflax.make_mesh({"data": 2, "model": 4})
    >>> s = NamedSharding(mesh, PartitionSpec("model"))
    >>> x = jax.device_put(-jnp.zeros(8), s)
    >>> y = jax.jit(lambda v: permute(v, np.arange(8)[::-1], 0, s), out_shardings=s)(x)
    >>> bool(np.signbit(np.asarray(y)).all()), y.sharding == s
    (True, True)
    """
    index = np.asarray(index)
    axes = split_axes(sharding, dim)
    if not axes:  # whole on each device: a local gather
        return jnp.take(x, index, axis=dim, mode="clip")
    send, recv = tables(index, math.prod(sharding.mesh.shape[a] for a in axes))

    def body(block: Any) -> Any:
        k = jax.lax.axis_index(axes)
        out = jnp.take(block, jnp.asarray(send)[k], axis=dim, mode="clip")
        got = jax.lax.all_to_all(out, axes, dim, dim, tiled=True)
        return jnp.take(got, jnp.asarray(recv)[k], axis=dim, mode="clip")

    return jax.shard_map(body, mesh=sharding.mesh, in_specs=sharding.spec, out_specs=sharding.spec)(x)


@functools.lru_cache(maxsize=256)
def program(index: bytes, dim: int, sharding: Any) -> Any:
    """The jitted :func:`permute` for arrays placed as ``sharding`` (``index`` as int64 bytes, hashable); on one
    device the output is where the input is, committed only if it was (a fresh ``jnp`` array is not)."""
    at = np.frombuffer(index, np.int64)
    fn = functools.partial(permute, index=at, dim=dim, sharding=sharding)
    return jax.jit(fn, out_shardings=sharding) if isinstance(sharding, NamedSharding) else jax.jit(fn)


__all__ = ["permute", "program", "split_axes", "tables"]
