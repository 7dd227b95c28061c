"""Property tests: every plan tpflax emits is valid and deterministic.

Random parameter trees (nested dicts and lists; 0-D to 5-D leaves; prime,
power-of-two and awkward sizes; several dtypes; boxed and unboxed leaves) on
random meshes of 1 to 4 axes (sizes 1..16, up to 2048 devices, abstract).
`--hypothesis-profile=thorough` runs 10x more examples.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from hypothesis import given
from hypothesis import strategies as st

import tpflax
from tpflax.specs import entries, entry_axes, spec_problems

SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 12, 13, 16, 24, 31, 32, 48, 64, 96, 97, 128, 250, 256,
                         384, 1000, 1024, 4096])
DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.bool_])
NAMES = st.sampled_from(["kernel", "bias", "scale", "embedding", "w", "wi", "wo", "mlp", "up", "down",
                         "up_proj", "down_proj", "gate_proj", "attn", "q_proj", "k_proj", "v_proj",
                         "o_proj", "query", "key", "value", "out", "norm", "ln_1", "layers", "conv1",
                         "conv2", "moe", "router", "head", "lm_head", "x", "layer_0", "layer_1"])
AXIS_NAMES = ["data", "fsdp", "model", "expert", "tp", "dp"]


@st.composite
def leaves(draw):
    shape = tuple(draw(st.lists(SIZES, min_size=0, max_size=5)))
    leaf = jax.ShapeDtypeStruct(shape, draw(DTYPES))
    if shape and draw(st.integers(0, 9)) == 0:  # boxed in flax metadata, sometimes
        names = tuple(draw(st.sampled_from([None, "model", "fsdp", "data", "nope"])) for _ in shape)
        if draw(st.booleans()):
            return nn.Partitioned(leaf, names=names)
        logical = tuple(draw(st.sampled_from([None, "embed", "mlp", "heads", "vocab", "kv"]))
                        for _ in shape)
        return nn.LogicallyPartitioned(leaf, names=logical)
    return leaf


trees = st.recursive(
    leaves(),
    lambda children: st.one_of(
        st.dictionaries(NAMES, children, min_size=1, max_size=5),
        st.lists(children, min_size=1, max_size=3)),
    max_leaves=24)


@st.composite
def meshes(draw):
    n = draw(st.integers(1, 4))
    names = draw(st.lists(st.sampled_from(AXIS_NAMES), min_size=n, max_size=n, unique=True))
    sizes = [draw(st.integers(1, 16)) for _ in names]
    while math.prod(sizes) > 2048:
        sizes[sizes.index(max(sizes))] //= 2
    return dict(zip(names, sizes, strict=True))


def _has_leaves(tree) -> bool:
    return bool(jax.tree_util.tree_leaves(tree, is_leaf=tpflax.tree.is_box))


@given(tree=trees, mesh=meshes(), fsdp_min=st.sampled_from([0, 1024, 1 << 18]))
def test_every_spec_is_valid(tree, mesh, fsdp_min):
    if not _has_leaves(tree):
        return
    p = tpflax.plan(tree, mesh, fsdp_min_bytes=fsdp_min)
    leaves_, _ = tpflax.tree.walk(tree)
    assert set(p.decisions) == {leaf.path for leaf in leaves_}
    sizes = p.mesh.sizes
    for path, d in p.decisions.items():
        spec = entries(d.spec)
        assert len(spec) <= len(d.shape), path
        assert not spec_problems(path, d.shape, spec, p.mesh), path
        used = [a for e in spec for a in entry_axes(e)]
        assert len(used) == len(set(used)), path
        for dim, e in enumerate(spec):
            n = math.prod(sizes[a] for a in entry_axes(e))
            assert d.shape[dim] % n == 0, path
        assert d.reason, path
        assert d.bytes_per_device * math.prod(
            math.prod(sizes[a] for a in entry_axes(e)) for e in spec) == d.bytes


@given(tree=trees, mesh=meshes())
def test_plan_is_deterministic_and_order_free(tree, mesh):
    if not _has_leaves(tree):
        return
    a = tpflax.plan(tree, mesh)
    b = tpflax.plan(tree, mesh)
    assert a.to_json() == b.to_json()
    c = tpflax.plan(_reverse_dicts(tree), mesh)
    assert {k: v.spec for k, v in c.decisions.items()} == {k: v.spec for k, v in a.decisions.items()}
    assert {k: v.reason for k, v in c.decisions.items()} == {k: v.reason for k, v in a.decisions.items()}


def _reverse_dicts(tree):
    if isinstance(tree, dict):
        return {k: _reverse_dicts(tree[k]) for k in reversed(list(tree))}
    if isinstance(tree, list):
        return [_reverse_dicts(x) for x in tree]
    return tree


@given(tree=trees, mesh=meshes())
def test_json_round_trips(tree, mesh):
    if not _has_leaves(tree):
        return
    p = tpflax.plan(tree, mesh)
    q = tpflax.Plan.from_json(p.to_json())
    assert q.decisions == p.decisions and q.to_json() == p.to_json()
