"""Decisions carry the facts the planner learned: kind, role, layers dim, unit, group, trainable."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo

S = jax.ShapeDtypeStruct
F = "float32"


def _scanned_fn(variables, x):
    """Two stacked layers under lax.scan, in a subtree no name marks as a stack."""
    p = variables["params"]

    def body(h, w):
        return h + jax.nn.relu(h @ w[0]) @ w[1], None

    h, _ = jax.lax.scan(body, x, (p["layers"]["up"], p["layers"]["down"]))
    return h @ p["out"]["kernel"]


SCANNED = {"params": {"layers": {"up": S((3, 16, 64), F), "down": S((3, 64, 16), F)},
                      "out": {"kernel": S((16, 64), F)}}}  # logits wider than their input: split by cost


def test_traced_layers_dim_comes_from_the_scan():
    tree = tpflax.plan(SCANNED, {"model": 2})
    assert tree.decisions["params/layers/up"].layers_dim is None  # two leaves: the tree cannot tell
    p = tpflax.plan(SCANNED, {"model": 2}, model=_scanned_fn, sample=(S((4, 16), F),))
    up, down = p.decisions["params/layers/up"], p.decisions["params/layers/down"]
    assert (up.spec, up.role, up.layers_dim, up.source) == (P(None, None, "model"), "column", 0, "trace")
    assert (down.spec, down.role, down.layers_dim) == (P(None, "model", None), "row", 0)
    assert p.decisions["params/out/kernel"].layers_dim is None


def test_output_heads_are_kind_head_in_both_rule_sets():
    traced = tpflax.plan(SCANNED, {"model": 2}, model=_scanned_fn, sample=(S((4, 16), F),))
    out = traced.decisions["params/out/kernel"]
    assert (out.kind, out.strategy, out.spec) == ("head", "column", P(None, "model"))
    tree = {"params": {"lm_head": {"kernel": S((64, 512), F)}, "w": S((4, 4), F)}}
    for mesh, spec in (({"model": 2}, P(None, "model")), ({"data": 2}, P(None, None))):
        d = tpflax.plan(tree, mesh).decisions["params/lm_head/kernel"]
        assert (d.kind, d.spec) == ("head", spec), mesh
    assert tpflax.plan(tree, {"model": 2}).decisions["params/w"].kind == "dense"


@pytest.mark.parametrize("traced", [False, True])
def test_conv_pairs_have_column_and_row_roles(traced):
    m = zoo.get("cnn")
    kw = {"model": m} if traced else {}
    p = tpflax.plan(m.abstract_variables(), {"model": 2}, min_channels=8, **kw)
    a, b = p.decisions["params/block_0/conv1/kernel"], p.decisions["params/block_0/conv2/kernel"]
    assert (a.strategy, a.role, b.role) == ("channel", "column", "row")
    assert a.pair == b.pair is not None


def test_expert_pairs_have_roles_and_plain_facts():
    tree = {"params": {"moe": {"wi": S((4, 64, 256), F), "wo": S((4, 256, 64), F)},
                       "norm": {"scale": S((64,), F)}},
            "batch_stats": {"bn": {"mean": S((64,), F)}}}
    p = tpflax.plan(tree, {"expert": 2, "model": 2})
    wi, wo = p.decisions["params/moe/wi"], p.decisions["params/moe/wo"]
    assert (wi.spec, wi.role, wo.spec, wo.role) == (P("expert", None, "model"), "column",
                                                     P("expert", "model", None), "row")
    assert (wi.unit, wi.group, wi.trainable) == ("params/moe/wi", "params/moe/wi", True)
    assert p.decisions["batch_stats/bn/mean"].trainable is False
