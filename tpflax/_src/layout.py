"""Head-aligned storage of a fused kernel: its fused dim kept rank by rank.

A fused ``[q | k | v]`` kernel ``(d, 3d)`` split contiguously over ``n``
tensor ranks gives rank 0 all of q's first heads and none of v's, so XLA
reshards the activations where the model cuts the output apart (see
:mod:`tpflax._src.cost.reshard`). Stored *interleaved*, rank ``r``'s
contiguous block holds ``[q_r | k_r | v_r]``: each rank keeps whole heads of
every piece, and a step that cuts the pieces per rank (see
:mod:`tpflax._src.apply.aligned`) needs no reshard.

An :class:`Interleave` names the dim, its pieces' natural sizes (GQA's are
unequal) and the rank count; :func:`to_storage` and :func:`from_storage` move a
leaf between the model's order and the stored one. Both are gathers along one
dim, so the round trip is bit-exact.

>>> lay = Interleave(dim=1, pieces=(4, 2, 2), ranks=2)
>>> lay.order().tolist()
[0, 1, 4, 6, 2, 3, 5, 7]
>>> import numpy as np
>>> x = np.arange(16).reshape(2, 8)
>>> bool((from_storage(to_storage(x, lay), lay) == x).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tpflax._src.errors import PlanFormatError


@dataclass(frozen=True)
class Interleave:
    """The stored order of a fused dim: rank by rank, each rank's share of every piece in turn.

    Attributes:
        dim: the fused dim of the leaf (non-negative).
        pieces: the pieces' sizes along ``dim`` in the model's order (``(d, d, d)``
            for q|k|v, ``(H*hd, K*hd, K*hd)`` with grouped K/V heads).
        ranks: the shards along ``dim`` (the product of the mesh axes splitting it);
            every piece divides by it.
    """

    dim: int
    pieces: tuple[int, ...]
    ranks: int

    def __post_init__(self) -> None:
        bad = [s for s in self.pieces if self.ranks <= 0 or s <= 0 or s % self.ranks]
        if self.dim < 0 or len(self.pieces) < 2 or bad:
            raise PlanFormatError(
                f"interleave over dim {self.dim} of pieces {self.pieces} and {self.ranks} ranks: "
                "the dim must be non-negative, with two or more positive pieces that each divide by the ranks")

    @property
    def size(self) -> int:
        return sum(self.pieces)

    def order(self) -> np.ndarray:
        """``order[i]`` is the natural position stored at position ``i``."""
        starts = np.cumsum((0,) + self.pieces[:-1])
        blocks = [np.arange(s + r * (w // self.ranks), s + (r + 1) * (w // self.ranks))
                  for r in range(self.ranks) for s, w in zip(starts, self.pieces, strict=True)]
        return np.concatenate(blocks)

    def inverse(self) -> np.ndarray:
        """``inverse[j]`` is the stored position of natural position ``j``."""
        return np.argsort(self.order(), kind="stable")

    def to_json(self) -> dict:
        return {"dim": self.dim, "pieces": list(self.pieces), "ranks": self.ranks}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Interleave:
        return cls(dim=int(d["dim"]), pieces=tuple(int(x) for x in d["pieces"]), ranks=int(d["ranks"]))


def _take(x: Any, index: np.ndarray, dim: int) -> Any:
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.take(x, index, axis=dim)
    import jax.numpy as jnp  # a jax array (or tracer): gather on device

    return jnp.take(x, index, axis=dim)


def check_fits(x: Any, lay: Interleave) -> None:
    """PlanFormatError unless ``x`` has ``lay``'s size on its dim."""
    shape = np.shape(x)
    if len(shape) <= lay.dim or shape[lay.dim] != lay.size:
        raise PlanFormatError(
            f"a leaf of shape {tuple(shape)} cannot hold an interleave of pieces {lay.pieces} on dim "
            f"{lay.dim} (it needs {lay.size} there); was the plan made for another tree?")


def to_storage(x: Any, lay: Interleave) -> Any:
    """The leaf in stored order (numpy in, numpy out; a jax array is gathered on device)."""
    check_fits(x, lay)
    return _take(x, lay.order(), lay.dim)


def from_storage(x: Any, lay: Interleave) -> Any:
    """The leaf back in the model's order; ``from_storage(to_storage(x))`` equals ``x`` bit for bit."""
    check_fits(x, lay)
    return _take(x, lay.inverse(), lay.dim)
