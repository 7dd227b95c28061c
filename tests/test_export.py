"""Exports round-trip: plan.to_rules() and plan.to_logical_axis_rules() give back the plan on every zoo model;
tpflax.from_rules imports EasyLM- and MaxText-style rules into plans the estimate can cost."""

from __future__ import annotations

import re

import jax
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo

S = jax.ShapeDtypeStruct
FAMILIES = [n for n in zoo.names() if "tiny" in zoo._REGISTRY[n].presets]
ALIASES = [n for n in zoo.names() if n not in FAMILIES]
MESHES = ["data=2,model=4", "fsdp=4,model=2", "data=2,fsdp=2,expert=2"]
_TREES: dict[str, object] = {}


def tree_of(name: str):
    if name not in _TREES:
        _TREES[name] = zoo.get(name).abstract_variables()
    return _TREES[name]


def is_spec(x) -> bool:
    return isinstance(x, P)


def flat_specs(specs):
    return jax.tree_util.tree_flatten(specs, is_leaf=is_spec)


def assert_same_specs(got, want):
    g, w = flat_specs(got.specs), flat_specs(want.specs)
    assert g[1] == w[1]
    assert g[0] == w[0]
    assert {p: d.spec for p, d in got.decisions.items()} == {p: d.spec for p, d in want.decisions.items()}


def check_rules_round_trip(name: str, mesh: str):
    tree = tree_of(name)
    p = tpflax.plan(tree, mesh, fsdp_min_bytes=1 << 10)
    rules = p.to_rules()
    q = tpflax.plan(tree, mesh, rules=rules, fsdp_min_bytes=1 << 10)
    assert_same_specs(q, p)
    assert all(d.source == "rule" for d in q.decisions.values())
    assert not [w for w in q.warnings if w.startswith("rule ")]  # every exported rule wins somewhere
    # Compact: at most one rule per repeated-layer group and spec, plus the catch-all.
    assert len(rules) <= len({(d.group, d.spec) for d in p.decisions.values()}) + 1, rules
    return p, rules


def check_logical_round_trip(p):
    names, rules = p.to_logical_axis_rules()
    assert len({n for n, _ in rules}) == len(rules)
    for path, d in p.decisions.items():
        assert nn.logical_to_mesh_axes(names[path], rules) == d.spec, path


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", FAMILIES)
def test_exports_round_trip_on_every_zoo_family(name, mesh):
    p, _ = check_rules_round_trip(name, mesh)
    check_logical_round_trip(p)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALIASES)
def test_exports_round_trip_on_every_real_size_zoo_model(name):
    p, _ = check_rules_round_trip(name, "data=2,fsdp=4,model=8")
    check_logical_round_trip(p)


def test_rules_are_one_per_repeated_layer_not_one_per_index():
    p, rules = check_rules_round_trip("gpt2", "data=2,model=4")
    layers = {d.group for d in p.decisions.values() if "h_*" in d.group}
    assert layers and len(p.decisions) > len(rules)
    assert not [rx for rx, _ in rules if re.search(r"h_[0-9]", rx)], rules
    assert len(rules) <= len({d.group for d in p.decisions.values()}) + 1
    assert (r"^params/h_\d+/mlp/c_fc/kernel$", P(None, "model")) in rules
    assert rules[-1] == (".*", P())


def test_a_layer_that_differs_from_its_pattern_gets_an_exact_rule_first():
    tree = {f"layers_{i}": {"up": {"kernel": S((64, 256), "float32")}, "down": {"kernel": S((256, 64), "float32")}}
            for i in range(3)}
    p = tpflax.plan(tree, {"model": 4}, rules=[("layers_1/up", "replicate")])
    rules = p.to_rules()
    exact = rules.index((r"^layers_1/up/kernel$", P(None, None)))
    assert exact < rules.index((r"^layers_\d+/up/kernel$", P(None, "model")))
    assert_same_specs(tpflax.plan(tree, {"model": 4}, rules=rules), p)


def test_logical_rules_work_in_flax_with_a_real_mesh():
    p = tpflax.plan(tree_of("llama"), "fsdp=2,model=4", fsdp_min_bytes=1 << 10)
    names, rules = p.to_logical_axis_rules()
    assert dict(rules)["embed"] == "fsdp" and dict(rules)["mlp"] == "model"
    mesh = tpflax.make_mesh("fsdp=2,model=4")
    logical = {path: P(*n) for path, n in names.items()}
    with nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(logical, mesh)
    assert {path: s.spec for path, s in shardings.items()} == {path: d.spec for path, d in p.decisions.items()}


def boxed(tree, names):
    """``tree`` with every leaf in nn.LogicallyPartitioned under ``names[path]``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = [nn.LogicallyPartitioned(x, names[jax.tree_util.keystr(k, simple=True, separator="/")])
           for k, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("name", ["gpt2", "llama", "moe"])
def test_from_rules_reads_its_own_exports_back(name):
    mesh = "data=2,fsdp=2,expert=2" if name == "moe" else "fsdp=2,model=4"
    p = tpflax.plan(tree_of(name), mesh, fsdp_min_bytes=1 << 10)
    q = tpflax.from_rules(tree_of(name), p.to_rules(), mesh)
    assert_same_specs(q, p)
    assert {d.source for d in q.decisions.values()} == {"rule"} and not q.warnings
    names, rules = p.to_logical_axis_rules()
    r = tpflax.from_rules(boxed(tree_of(name), names), rules, mesh)
    assert {path: d.spec for path, d in r.decisions.items()} == {path: d.spec for path, d in p.decisions.items()}
    assert {d.source for d in r.decisions.values()} == {"rule"} and not r.warnings


EASYLM_GPT2 = [  # EasyLM's GPT-J/LLaMA rules, rewritten for the zoo gpt2's names
    ("wte/embedding", P("model", "fsdp")),
    ("attn/(query|key|value)/kernel", P("fsdp", "model")),
    ("attn/out/kernel", P("model", "fsdp")),
    ("mlp/c_fc/kernel", P("fsdp", "model")),
    ("mlp/c_proj/kernel", P("model", "fsdp")),
    (".*", P(None)),
]


def test_from_rules_imports_easylm_rules_and_the_estimate_costs_them():
    gpt2 = zoo.get("gpt2")
    tree = tree_of("gpt2")
    mesh = "fsdp=2,model=4"
    p = tpflax.from_rules(tree, EASYLM_GPT2, mesh)
    assert p.spec("params/h_0/mlp/c_fc/kernel") == P("fsdp", "model")
    assert p.spec("params/wpe/embedding") == P(None, None)
    d = p.decisions["params/h_1/attn/key/kernel"]
    assert d.source == "rule" and d.strategy == "rule" and "imported rule 1" in d.reason
    batch = jax.eval_shape(lambda: gpt2.make_batch(0, 8))
    imported = tpflax.estimate(p, optax.adamw(1e-3), batch, model=gpt2)
    planned = tpflax.estimate(tpflax.plan(tree, mesh), optax.adamw(1e-3), batch, model=gpt2)
    assert imported.per_device.params == p.bytes_per_device  # the estimate reads the imported specs
    assert imported.comm_total > 0 and planned.comm_total > 0


def test_from_rules_replicates_and_names_uncovered_leaves():
    tree = {"a": {"kernel": S((64, 256), "float32")}, "b": {"kernel": S((256, 64), "float32")}}
    p = tpflax.from_rules(tree, [("^a/", P(None, "model"))], {"model": 4})
    assert p.spec("b/kernel") == P(None, None) and p.decisions["b/kernel"].strategy == "replicate"
    assert any("1 leaves match no rule" in w and "b/kernel" in w for w in p.warnings)
    with pytest.raises(tpflax.RuleError, match="does not compile"):
        tpflax.from_rules(tree, [("(", P())], {"model": 4})
    with pytest.raises(tpflax.SpecError, match="not divisible"):
        tpflax.from_rules(tree, [("a", P("model", None)), ("b", P(None, "model"))], {"model": 3})


def test_from_rules_reads_strategy_rules_on_an_annotated_tree_as_regex_rules():
    """A tree boxed in logical annotations with ``(regex, strategy)`` rules: the strategies are no mesh axes,
    so the rules are regex rules (they were read as logical rules, matched no logical name, and every
    leaf was replicated). A logical rule list, whose targets are mesh axes or None, is still read as one."""
    tree = {"up": {"kernel": nn.LogicallyPartitioned(S((64, 256), "float32"), ("embed", "mlp"))},
            "down": {"kernel": nn.LogicallyPartitioned(S((256, 64), "float32"), ("mlp", "embed"))}}
    p = tpflax.from_rules(tree, [("up/kernel", "column"), ("down/kernel", "row")], {"model": 4})
    assert (p.spec("up/kernel"), p.spec("down/kernel")) == (P(None, "model"), P("model", None))
    assert p.options["rules"] and not p.options.get("logical_rules")
    q = tpflax.from_rules(tree, [("mlp", "model"), ("embed", None)], {"model": 4})
    assert (q.spec("up/kernel"), q.spec("down/kernel")) == (P(None, "model"), P("model", None))
    assert q.options["logical_rules"] == [["mlp", "model"], ["embed", None]]
    # MaxText's rule lists name axes a mesh may lack, some of them strategy names too ("fsdp", "expert"):
    # still logical rules, the absent axes dropped
    maxtext = [("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("exp", "expert")]
    r = tpflax.from_rules(tree, maxtext, {"data": 2, "tensor": 4})
    assert (r.spec("up/kernel"), r.spec("down/kernel")) == (P(None, "tensor"), P("tensor", None))


def test_unknown_logical_names_are_warned_not_silently_replicated():
    tree = {"mlp": {"kernel": nn.LogicallyPartitioned(S((64, 256), "float32"), ("embed", "mlpp"))}}
    p = tpflax.plan(tree, {"model": 4})
    assert p.spec("mlp/kernel") == P(None, None)
    assert any("'mlpp'" in w and "mlp/kernel dim 1" in w and "logical_rules" in w for w in p.warnings)
    q = tpflax.plan(tree, {"model": 4}, logical_rules=[("embed", None), ("mlpp", "model")])
    assert q.spec("mlp/kernel") == P(None, "model") and not q.warnings


def test_a_mesh_axis_that_splits_nothing_is_warned_and_strict_exits_1(capsys):
    from tpflax.cli import main

    p = tpflax.plan(tree_of("gpt2"), "model=3")
    assert any("mesh axis 'model' (size 3, role tensor) splits no leaf" in w for w in p.warnings)
    assert main(["plan", "gpt2", "--mesh", "model=3"]) == 0
    assert "splits no leaf" in capsys.readouterr().out
    assert main(["plan", "gpt2", "--mesh", "model=3", "--strict"]) == 1
    # data axes split the batch, not parameters: no warning for them
    assert not [w for w in tpflax.plan(tree_of("gpt2"), "data=2,model=4").warnings if "splits no leaf" in w]


def test_from_rules_with_the_rules_and_the_mesh_swapped_says_the_order():
    # from_rules(tree, mesh, rules) read the rules as a mesh: "axis 'up' has size P(None, 'model'); sizes must be
    # integers >= 1", and a role for an axis named 'up'
    tree = {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")}}
    rules = [("up", P(None, "model"))]
    for mesh in ({"data": 2, "model": 4}, "data=2,model=4", tpflax.make_mesh({"data": 2, "model": 4})):
        with pytest.raises(tpflax.OptionError, match=r"swapped; pass them as from_rules\(tree, rules, mesh\)"):
            tpflax.from_rules(tree, mesh, rules)
        assert tpflax.from_rules(tree, rules, mesh).spec("up/kernel") == P(None, "model")
