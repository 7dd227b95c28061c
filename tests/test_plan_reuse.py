"""Alike leaves reuse an earlier leaf's priced fsdp choice (planner.leaf_groups.fsdp): the plan is the
one the chooser gives each leaf on its own, and a leaf that differs is priced for itself."""

from __future__ import annotations

import jax
import pytest

import tpflax

S = jax.ShapeDtypeStruct
MESH = {"fsdp": 4, "model": 2}


def layer(d: int = 64, f: int = 256, dtype: str = "float32") -> dict:
    return {"norm": {"scale": S((d,), dtype)},
            "mlp": {"up": {"kernel": S((d, f), dtype), "bias": S((f,), dtype)},
                    "down": {"kernel": S((f, d), dtype), "bias": S((d,), dtype)}},
            "gate": S((1, d), dtype)}


def second(p: tpflax.Plan) -> dict:
    """The decisions of ``layers_1``, by path."""
    return {q: d for q, d in p.decisions.items() if "/layers_1/" in q}


def fresh(one: dict, **kw) -> dict:
    """``layers_1``'s decisions where nothing before it is alike (``layers_0`` in another dtype), so
    each of its leaves is priced for itself."""
    return second(tpflax.plan({"params": {"layers_0": layer(dtype="bfloat16"), "layers_1": one}}, MESH, **kw))


@pytest.mark.parametrize("kw", [{}, {"batch": (4, 32)}, {"hardware": "h100"}])
def test_reused_choice_is_the_leafs_own(kw):
    """Two alike layers: the second takes the first one's fsdp choices, and every field of its
    decisions (spec, reason, alternatives and their costs) is what pricing it alone gives."""
    p = tpflax.plan({"params": {"layers_0": layer(), "layers_1": layer()}}, MESH, **kw)
    got, want = second(p), fresh(layer(), **kw)
    assert got.keys() == want.keys() and len(got) == 6
    for q in got:
        assert got[q] == want[q], q
    assert any(d.fsdp for d in got.values()) and all(d.alternatives for d in got.values() if d.fsdp)
    # the reason is the leaf's own: it names its own partner, not layers_0's
    assert "layers_1/mlp/down" in got["params/layers_1/mlp/up/kernel"].reason
    assert "layers_0" not in "".join(d.reason for d in got.values())


@pytest.mark.parametrize("other, kw", [
    (layer(f=258), {}),  # another shape: 258 does not divide fsdp=4
    (layer(dtype="bfloat16"), {}),  # another dtype: half the bytes the alternatives price
    (layer(), {"trainable": r"layers_0"}),  # frozen: no gradient or moments to split
])
def test_a_leaf_that_differs_is_priced_for_itself(other, kw):
    """A layer that differs from the one before it (shape, dtype, trainable) does not take its
    neighbour's choice: its decisions are those it gets when nothing before it is alike."""
    p = tpflax.plan({"params": {"layers_0": layer(), "layers_1": other}}, MESH, **kw)
    got = second(p)
    want = fresh(other, **({"trainable": r"layers_0"} if kw else {}))
    for q in got:
        assert got[q] == want[q], q
    first = {q.replace("layers_0", "layers_1"): d for q, d in p.decisions.items() if "/layers_0/" in q}
    assert any(got[q].alternatives != first[q].alternatives or got[q].reason != first[q].reason for q in got)

