"""tpflax.diff and `tpflax diff`: the leaves that differ, what each side costs, and a plan lockfile for CI."""

from __future__ import annotations

import io
import json
import sys

import jax
import optax
import pytest

import tpflax
from tpflax import zoo
from tpflax.cli import main


@pytest.fixture(scope="module")
def gpt2():
    return zoo.get("gpt2")


@pytest.fixture(scope="module")
def plans(gpt2):
    tree = gpt2.abstract_variables()
    return (tpflax.plan(tree, "data=2,model=4"),
            tpflax.plan(tree, "data=2,model=4", rules=[("mlp/c_fc", "replicate")]))


def test_diff_groups_the_changed_leaves_and_prices_both_sides(plans, gpt2):
    a, b = plans
    d = tpflax.diff(a, b)
    assert d.changed and not d.version_changes
    changed = {p for c in d.changes for p in c.paths}
    assert changed == {p for p in a.decisions if "mlp/c_fc" in p}
    kernel = next(c for c in d.changes if c.paths[0].endswith("c_fc/kernel"))
    assert len(kernel.paths) == gpt2.config.n_layers and kernel.b == "P(None, None)"
    assert kernel.bytes_b == 4 * kernel.bytes_a  # model=4 no longer splits it
    assert (d.a.bytes_per_device, d.b.bytes_per_device) == (a.bytes_per_device, b.bytes_per_device)
    assert d.a.comm is None  # no batch: no communication estimate
    text = str(d)
    assert "h_{0,1}/mlp/c_fc/kernel ×2" in text and "parameters on the fullest device" in text
    assert not tpflax.diff(a, a).changed and not tpflax.diff(a, a).changes


def test_with_a_batch_each_side_gets_the_estimates_communication(plans, gpt2):
    a, b = plans
    batch = jax.eval_shape(lambda: gpt2.make_batch(0, 8))
    d = tpflax.diff(a, b, optimizer=optax.adamw(1e-3), batch=batch, model=gpt2)
    assert d.a.comm == tpflax.estimate(a, optax.adamw(1e-3), batch, model=gpt2).comm_total
    assert d.b.comm == tpflax.estimate(b, optax.adamw(1e-3), batch, model=gpt2).comm_total
    assert d.a.comm != d.b.comm and "communication per step" in str(d)


def test_diff_reads_json_and_reports_version_changes(plans):
    a, _ = plans
    doc = json.loads(tpflax.report(a, fmt="json"))
    assert set(doc["versions"]) == {"tpflax", "jax", "flax"}
    old = dict(doc, versions=dict(doc["versions"], jax="0.0.1"))
    d = tpflax.diff(json.dumps(old), tpflax.report(a, fmt="json"))
    assert not d.changed and d.version_changes == {"jax": ("0.0.1", jax.__version__)}
    assert f"jax changed: 0.0.1 -> {jax.__version__}" in str(d)
    with pytest.raises(tpflax.OptionError, match="takes a tpflax.Plan"):
        tpflax.diff(a, 3)


def test_cli_lockfile_recipe(tmp_path, capsys, monkeypatch):
    lock = tmp_path / "plan.lock.json"
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--json"]) == 0
    lock.write_text(capsys.readouterr().out)
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--json"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(capsys.readouterr().out))
    assert main(["diff", str(lock), "-", "--fail-on-change"]) == 0
    assert "same specs for every leaf" in capsys.readouterr().out
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--rule", "wte=replicate", "--json"]) == 0
    changed = tmp_path / "b.json"
    changed.write_text(capsys.readouterr().out)
    assert main(["diff", str(lock), str(changed)]) == 0  # a report, not a gate
    assert main(["diff", str(lock), str(changed), "--fail-on-change"]) == 1
    assert "wte/embedding" in capsys.readouterr().out
    assert main(["diff", str(lock), str(changed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is True
    assert main(["diff", str(lock), str(tmp_path / "missing.json")]) == 2
    assert "cannot read plan file" in capsys.readouterr().err


def test_cli_plans_on_different_meshes_say_so_first(tmp_path, capsys):
    # it printed "same specs for every leaf" (the specs name axes, not their sizes)
    tree = {"w": jax.ShapeDtypeStruct((64, 64), "float32")}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(tpflax.plan(tree, {"model": 2}, rules=[("w", "row")]).to_json())
    pb.write_text(tpflax.plan(tree, {"model": 4}, rules=[("w", "row")]).to_json())
    assert main(["diff", str(pa), str(pb), "--fail-on-change"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["tpflax diff  the meshes differ: a: mesh model=2  b: mesh model=4",
                         "  same specs for every leaf, but on different meshes"]
    assert lines[2] == "parameters on the fullest device: 8.0 KiB -> 4.0 KiB"


def test_cli_batch_is_token_ids_of_that_length(plans, tmp_path, capsys):
    # --batch 8x32 and 8x1024 printed the same communication: "BxT" was read as float features
    from tpflax.cli import main

    a, b = plans
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(a.to_json())
    pb.write_text(b.to_json())
    seen = {}
    for text in ("8x32", "8x1024"):
        assert main(["diff", str(pa), str(pb), "--batch", text, "--json"]) == 0
        seen[text] = json.loads(capsys.readouterr().out)
        ids = {"x": jax.ShapeDtypeStruct(tuple(int(n) for n in text.split("x")), "int32")}
        assert seen[text]["a"]["comm"] == tpflax.estimate(a, optax.adamw(1e-3), ids).comm_total
    assert seen["8x1024"]["a"]["comm"] > seen["8x32"]["a"]["comm"]


def test_a_head_aligned_layout_is_a_change_though_the_specs_are_equal():
    """``fused="aligned"`` stores a fused q|k|v kernel head-aligned: the spec is the same, the bytes each device
    holds are not, so a lockfile must see it (diff compared specs and shapes only: "same specs for every leaf")."""
    import flax.linen as nn
    import jax.numpy as jnp

    d, heads = 64, 8

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            b, t, _ = x.shape
            q, k, v = (y.reshape(b, t, heads, d // heads)
                       for y in jnp.split(nn.Dense(3 * d, name="c_attn")(x), 3, axis=-1))
            a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), -1)
            return x + nn.Dense(d, name="c_proj")(jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, d))

    x = jax.ShapeDtypeStruct((2, 8, d), "float32")
    tree = jax.eval_shape(Block().init, jax.random.key(0), x)
    split, aligned = (tpflax.plan(tree, "data=2,model=4", model=Block(), sample=(x,), fused=f)
                      for f in ("split", "aligned"))
    assert split.spec("params/c_attn/kernel") == aligned.spec("params/c_attn/kernel")
    assert aligned.decisions["params/c_attn/kernel"].layout is not None
    for a, b in ((split, aligned), (split.to_json(), aligned.to_json())):
        diff = tpflax.diff(a, b)
        assert diff.changed
        kernel = next(c for c in diff.changes if c.paths == ("params/c_attn/kernel",))
        assert kernel.a == "P(None, 'model')"
        assert kernel.b == "P(None, 'model') head-aligned (dim 1: pieces 64|64|64 over 4)"
    assert not tpflax.diff(aligned, aligned.to_json()).changed
