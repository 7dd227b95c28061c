"""The reshape handler: how a tag follows a dim that a reshape cuts or merges.

The major input dim of a split or merge maps to the major output dim, so heads
survive ``(d) -> (heads, head_dim)``; a split that runs on into the minor part
(4 heads over 4 ranks cut into 2 kv heads x 2 groups) follows it there under the
tag's :func:`tpflax._src.trace.interpreter.minor_key`.

>>> import jax, jax.numpy as jnp
>>> from tpflax._src.trace.handlers import new_walk
>>> from tpflax._src.trace.interpreter import Val
>>> eqn = jax.make_jaxpr(lambda x: x.reshape(2, 2, 2, 8))(jnp.zeros((2, 4, 8))).eqns[0]
>>> out = reshape(new_walk(), eqn, [Val(3, tags=({}, {(0, 1): (4, ())}, {}))], (), [4])[0]
>>> out.tags[1], out.tags[2]  # 4 ranks: one (kv head, group) each
({(0, 1): (4, ())}, {(0, -2): (2, ())})
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from tpflax._src.trace.interpreter import Val, Walk, is_minor, minor_key, moved_parts


def reshape(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """The major input dim of a split or merge maps to the major output dim; a tag on any other
    input dim is interleaved with its neighbours and ends. A dim cut into ``(major, minor)`` keeps
    its tags on the major dim, and where a split of it can run on into the minor dim (4 heads over
    4 ranks cut into 2 kv heads x 2 groups: one (kv head, group) each) the minor dim carries the
    tags' :func:`minor_key`; merged back, the two parts are one dim again (see :func:`spill`).
    """
    v = ins[0]
    src = tuple(eqn.invars[0].aval.shape)
    dst = tuple(eqn.outvars[0].aval.shape)
    mapping: list[int | None] = [None] * len(dst)
    limits: dict[int, int] = {}
    cuts: list[tuple[int, int, int]] = []  # (input dim, major output dim, minor output dim)
    joins: list[tuple[int, int, int]] = []  # (major input dim, minor input dim, output dim)
    for gin, gout in reshape_groups(src, dst):
        big_in = [d for d in gin if src[d] != 1]
        big_out = [d for d in gout if dst[d] != 1]
        if not big_in or not big_out:  # size-1 dims only
            for i, o in zip(gin, gout, strict=False):
                mapping[o] = i
            continue
        if len(big_in) == 1 and len(big_out) == 1:
            mapping[big_out[0]] = big_in[0]
            continue
        mapping[big_out[0]] = big_in[0]
        # the major parts' common size: a tag that ran on into a minor part is back to its major part
        limits[big_out[0]] = math.gcd(src[big_in[0]], dst[big_out[0]])
        rest = big_in[1:]
        if len(big_in) == 1:
            cuts.append((big_in[0], big_out[0], big_out[1]))
        elif len(big_out) == 1:
            joins.append((big_in[0], big_in[1], big_out[0]))
            rest = big_in[2:]
        for d in rest:
            w.escape(v.dim_tags(d), f"a reshape {src} -> {dst} merges it as a minor dim")
        if len(big_out) > 1 and not v.dim_tags(big_in[0]):
            # the group's lead dim is a row dim (untagged): a tagged dim regrouped with it moves part of its
            # elements into the rows (an upsampling (b, s/k, k*d) -> (b, s, d)), and so would its split
            for d in big_in[1:]:
                w.resequenced.update(k for k in v.dim_tags(d) if not is_minor(k))
    # For a reshaped parameter the major dim of a merged group stands for the group.
    out = w.moved(v, mapping, ranks[0], limit=limits)
    # A size-1 dim dropped before a dim that goes on is its major part, of one element: (1 kv head,
    # 4 copies) -> 4 heads (an MQA key repeated) splits over no more than 1.
    ones: list[tuple[int, int]] = []  # (size-1 input dim, output dim)
    for i in range(len(src)):
        after = next((j for j in range(i + 1, len(src)) if src[j] != 1), None)
        if src[i] == 1 and i not in mapping and after is not None and after in mapping:
            ones.append((i, mapping.index(after)))
    out = dataclasses.replace(out, picks=(), parts=_parts(w, v, mapping, cuts, dst))
    if (not cuts and not joins and not ones) or v.tags is None:
        return [out]
    tags = list(out.tags or ({},) * ranks[0])
    for i, o in ones:
        tags[o] = w.merge([tags[o], {k: (1, via) for k, (_, via) in v.dim_tags(i).items()}])
    picks = []
    for i, o, o2 in cuts:
        later: dict = {}  # the tags o2 takes if o is cut into single pieces (see Walk.pick)
        for k, (lim, via) in w.merge([v.dim_tags(i)]).items():
            s = 1 if is_minor(k) else spill(lim, dst[o], dst[o2])
            if not is_minor(k):
                w.cut.add(k)
            if s > 1:
                if k in w.spills:
                    # an earlier cut of this tag's dim left a minor part on another dim (the head_dim of the heads
                    # now regrouped (kv_heads, groups)): it keeps its own cut's cap under a key of its own
                    sunk = w.sink(k, w.spills[k])
                    tags = [{(sunk if x == minor_key(k) else x): y for x, y in t.items()} if j != o2 else t
                            for j, t in enumerate(tags)]
                tags[o] = {**tags[o], k: (dst[o] * s, via)}
                tags[o2] = {**tags[o2], minor_key(k): (s, via)}
                w.spills[k] = math.gcd(w.spills.get(k, 0), dst[o])
            if not is_minor(k):
                # cut into single pieces (a fused qkv's (3, heads, head_dim) indexed on the 3: Walk.pick), the major
                # dim's split is the fused kernel's naive one and what runs on is the minor dim's own (6 heads), not
                # a spill into it (3 pieces x 6 heads over 9 ranks), whose key the pick drops
                later[k] = (math.gcd(lim, src[i] // dst[o], dst[o2]), via)
        if later:
            picks.append((o, o2, later))
    out = dataclasses.replace(out, picks=tuple(picks))
    for i, i2, o in joins:
        minor = w.merge([v.dim_tags(i2)])
        for k, (lim, via) in w.merge([v.dim_tags(i)]).items():
            if not is_minor(k) and minor_key(k) in minor:  # both parts of a cut dim: one dim again
                tags[o] = {**tags[o], k: (math.gcd(lim, src[i] * minor.pop(minor_key(k))[0]), via)}
        w.escape(minor, f"a reshape {src} -> {dst} merges it as a minor dim")
    return [dataclasses.replace(out, tags=tuple(tags) if any(tags) else None)]


def _parts(w: Walk, v: Val, mapping: list[int | None], cuts: list[tuple[int, int, int]], dst: tuple) -> tuple:
    """:attr:`Val.parts` of a parameter's reshape: a whole leaf dim cut into ``(major, minor)`` (DBRX's experts
    ``(E * f, d) -> (E, f, d)``) has its minor dim recorded as a part of it, with the major dim and its size."""
    carried = moved_parts(v.parts, mapping)
    if not v.origin or not cuts:
        return carried
    out = []
    for path, dims in v.origin:
        shape = w.shapes.get(path)
        ps = list(dict(carried).get(path, (None,) * len(dst)))
        for i, o, o2 in cuts:
            leaf = dims[i]
            if leaf is not None and shape is not None and leaf < len(shape) and shape[leaf] == dst[o] * dst[o2] \
                    and ps[o2] is None:
                ps[o2] = (leaf, o, dst[o])
        if any(x is not None for x in ps):
            out.append((path, tuple(ps)))
    return tuple(out) + tuple((p, ps) for p, ps in carried if p not in {q for q, _ in v.origin})


def spill(limit: int, major: int, minor: int) -> int:
    """How far a split of a dim (tag ``limit``) cut into ``(major, minor)`` runs into the minor dim.

    ``n`` ranks over ``major x minor`` elements in row-major order hold contiguous blocks that
    are shards of the two dims when ``n`` divides ``major`` (the minor dim whole) or ``major``
    divides ``n`` and ``n / major`` divides ``minor`` (each rank one slice of a major element).
    A limit says "any ``n`` dividing it": ``major x s`` with every divisor such an ``n`` needs
    ``major`` a prime power and ``s`` a power of the same prime (6 kv heads x 2 groups over 4
    ranks cuts a kv head's groups unevenly), so the split stays in the major dim otherwise.

    >>> spill(4, 2, 2), spill(64, 4, 16), spill(12, 6, 2), spill(24, 2, 12), spill(2, 2, 2)
    (2, 16, 1, 4, 1)
    """
    if limit % major:
        return 1
    p = next(q for q in range(2, major + 1) if major % q == 0)
    m = major
    while m % p == 0:
        m //= p
    rest, s = math.gcd(limit // major, minor), 1
    while m == 1 and rest % p == 0:
        rest //= p
        s *= p
    return s


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims with equal products (row-major reshape).

    >>> reshape_groups((2, 12), (2, 3, 4))
    [([0], [0]), ([1], [1, 2])]
    """
    groups = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if i < len(src) and (pi <= pj or j >= len(dst)) and not (gi and gj and pi == pj):
                gi.append(i)
                pi *= src[i]
                i += 1
            elif j < len(dst) and not (gi and gj and pi == pj):
                gj.append(j)
                pj *= dst[j]
                j += 1
            else:
                break
            if gi and gj and pi == pj:
                # absorb trailing size-1 dims into this group
                while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
                    gi.append(i)
                    i += 1
                while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
                    gj.append(j)
                    j += 1
                break
        groups.append((gi, gj))
    return groups
