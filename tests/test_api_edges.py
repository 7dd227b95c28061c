"""The less-used corners of the public API: make_mesh's devices=, batches with odd leaves, the
mesh suggestion's messages."""

import re

import jax
import numpy as np
import optax
import pytest
from _util import nnx_mlp

import tpflax
from tpflax import zoo


def test_make_mesh_with_too_few_devices_given_says_the_list_is_short():
    # the process sees 8 devices: the advice to emulate more (XLA_FLAGS) was wrong, the caller's list is short
    with pytest.raises(tpflax.DeviceError, match=r"needs 8 devices but devices= gives 6") as e:
        tpflax.make_mesh({"data": 2, "model": 4}, devices=jax.devices()[:6])
    assert "XLA_FLAGS" not in str(e.value) and "jax.devices()[:8]" in str(e.value)
    with pytest.raises(tpflax.DeviceError, match=r"devices= gives 0"):
        tpflax.make_mesh({"model": 2}, devices=[])
    # too few in the process: the emulation advice stays
    with pytest.raises(tpflax.DeviceError, match=r"only 8 are available.*xla_force_host_platform_device_count=16"):
        tpflax.make_mesh({"data": 4, "model": 4})
    # a subset, in the caller's order
    m = tpflax.make_mesh({"data": 2, "model": 2}, devices=jax.devices()[::-1][:4])
    assert [d.id for d in np.ravel(m.devices)] == [7, 6, 5, 4]


def test_batch_leaves_jax_cannot_hold_are_named_before_anything_moves():
    # a str leaf was a bare TypeError from jax ("Argument 'wiki' of type <class 'str'> is not a valid JAX type")
    # naming no path; an array of strings passed the divisibility check, then failed in device_put
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    batch = {"x": np.ones((8, 3), np.float32), "meta": {"name": "wiki", "words": np.array(["a"] * 8)}, "step": 3}
    for call in (lambda: tpflax.shard_batch(batch, mesh), lambda: tpflax.batch_sharding(mesh, batch)):
        with pytest.raises(tpflax.TreeError, match="the batch has leaves that are not arrays") as e:
            call()
        assert e.value.problems[0].startswith("meta/name: leaf of type str is not an array")
        assert e.value.problems[1].startswith("meta/words: array of dtype <U1 (shape (8,)) is not numeric")
        assert len(e.value.problems) == 2
    # numbers, bools, None and numpy scalars are fine: scalars replicated, None kept
    ok = tpflax.shard_batch({"x": np.ones((8, 3)), "s": 3, "f": 1.5, "b": True, "g": np.float32(2), "n": None},
                            mesh)
    assert ok["x"].sharding.spec == jax.sharding.PartitionSpec("data") and ok["s"].sharding.spec == jax.sharding.PartitionSpec()
    assert ok["n"] is None


def test_suggestion_shows_sub_microsecond_comm_times():
    # a small model's collectives take nanoseconds: shown as whole microseconds, #2 read "4.96x the
    # communication time of #1: reduce-scatter takes 0 us over fsdp vs 0 us"
    s = tpflax.suggest_mesh(zoo.get("mlp"), 8, hardware="tpu-v5e", batch=8)
    lines = s.report_lines(top=5)
    assert 0 < s[0].comm_time < 1e-6
    assert not any(" 0 us" in line for line in lines), "\n".join(lines)
    second = s[1].why
    assert "x the communication time of #1" in second and " ns" in second, second
    assert any(line.rstrip().endswith(" ns") for line in lines if line.lstrip().startswith("1 ")), "\n".join(lines)


def test_no_fit_does_not_offer_levers_smaller_than_the_excess():
    # 1 KiB per device: the params alone are 40x that; remat (activations 11 KiB) and another optimizer
    # (state 150 KiB) were listed as what would help, as if either could close a 300 KiB gap
    with pytest.raises(tpflax.NoFitError) as e:
        tpflax.suggest_mesh(zoo.get("mlp"), 12, "1KiB", optimizer=optax.adam(1e-3), batch=12)
    helps = e.value.problems
    assert any(h.startswith("remat alone will not do: the activations are only") for h in helps), helps
    assert any(h.startswith("a cheaper optimizer alone will not do: its state is only") for h in helps), helps
    assert not any(h.startswith(("remat (", "a cheaper optimizer:")) for h in helps), helps


@pytest.mark.parametrize("slice_name,preset,devices", [("tpu-v5e:2x4", "tpu-v5e", 8), ("v4:2x2x2", "tpu-v4", 16)])
def test_a_tpu_slice_given_as_hardware_says_which_preset_it_means(slice_name, preset, devices):
    # make_mesh(target=) and estimate(target=) take slices; hardware= takes presets: the error named only the
    # presets, leaving the caller to guess that the slice's generation is one of them
    with pytest.raises(tpflax.SuggestError, match=rf"is a TPU slice, not a preset: pass hardware='{preset}' with "
                                                  rf"its {devices} devices"):
        tpflax.suggest_mesh(zoo.get("mlp"), devices, hardware=slice_name)
    with pytest.raises(tpflax.SuggestError) as e:
        tpflax.get_hardware("tpu-v9")
    assert "slice" not in str(e.value)


def test_a_tpu_slice_given_as_devices_says_which_count_it_means():
    with pytest.raises(tpflax.SuggestError, match=r"got 'tpu-v5e:4x4'; for the slice tpu-v5e:4x4 pass devices=16, "
                                                  r"hardware='tpu-v5e'"):
        tpflax.suggest_mesh(zoo.get("mlp"), "tpu-v5e:4x4")
    with pytest.raises(tpflax.SuggestError, match=r"got '8'$"):
        tpflax.suggest_mesh(zoo.get("mlp"), "8", hardware="tpu-v5e")


def test_an_optimizer_state_for_another_tree_names_the_leaves_that_differ():
    # the error said only "the state has 3 leaves; optimizer.init on the planned parameters makes 7"
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    params = {"embed": {"embedding": np.ones((64, 32), np.float32)},
              "mlp": {"up": {"kernel": np.ones((32, 128), np.float32)}, "down": {"kernel": np.ones((128, 32), np.float32)}}}
    plan = tpflax.plan(params, mesh)
    opt = optax.adam(1e-3)
    with pytest.raises(tpflax.PlanMismatchError) as e:
        tpflax.shard_optimizer_state(opt, opt.init({"embed": params["embed"]}), plan, mesh)
    assert e.value.problems[0] == "the state has 3 leaves; optimizer.init on the planned parameters makes 7"
    assert "0/mu/mlp/up/kernel: made for the planned parameters, missing from the state" in e.value.problems
    with pytest.raises(tpflax.PlanMismatchError) as e:
        tpflax.shard_optimizer_state(optax.sgd(0.1, momentum=0.9), opt.init(params), plan, mesh)
    assert "0/trace/mlp/down/kernel: made for the planned parameters, missing from the state" in e.value.problems
    assert "0/count: in the state, not made for the planned parameters" in e.value.problems
    assert e.value.problems[-1] == "... and 2 more"  # 6 of adam's leaves are not sgd's: 5 named


def test_the_estimate_says_which_memory_figure_must_fit():
    # the memory table's last row, the rows' sum, was labelled "total" right above "peak per device" with
    # another figure (tiny llama: total 1.7 MiB over a 1.5 MiB peak), and the HTML report's headline card
    # showed that sum as "per device per step": neither is what must fit, the peak is
    model = zoo.get("llama")
    plan = tpflax.plan(model.abstract_variables(), {"fsdp": 4, "model": 2})
    est = tpflax.estimate(plan, optax.adamw(1e-3), 32, model=model)
    assert est.per_device.total != est.peak
    lines = est.report_lines()
    rows = {line.split("  ")[1].strip(): line for line in lines if line.startswith("  ") and not line.startswith("   ")}
    assert "total" not in rows, lines
    assert rows["sum of rows"].split()[3:5] == tpflax.fmt_bytes(est.per_device.total).split()
    assert rows["peak per device"].split()[3:5] == tpflax.fmt_bytes(est.peak).split()
    page = tpflax.report(plan, est, fmt="html")
    assert f"<b>{tpflax.fmt_bytes(est.peak)}</b><span>peak per device per step: what must fit at once" in page
    assert f"<b>{tpflax.fmt_bytes(est.per_device.total)}</b>" not in page.split('class="cards"')[1].split("</div></div>")[0]


def test_optimizer_shardings_takes_an_nnx_optimizer_as_shard_optimizer_state_does():
    # shard_optimizer_state takes an nnx.Optimizer; optimizer_shardings of one was a bare
    # "AttributeError: 'Optimizer' object has no attribute 'init'" from flax, and of a non-optimizer a TypeError
    from flax import nnx

    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    model = nnx_mlp(32, 128)
    plan = tpflax.plan(model, mesh)
    for opt in (nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param), nnx.ModelAndOptimizer(model, optax.adam(1e-3))):
        got = tpflax.optimizer_shardings(opt, plan, mesh)
        placed = nnx.state(tpflax.shard_optimizer_state(opt, None, plan, mesh))
        specs = lambda t: jax.tree_util.tree_leaves(t, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))  # noqa: E731
        assert [s.spec for s in specs(got)] == [a.sharding.spec for a in jax.tree_util.tree_leaves(placed)]
        assert specs(got["opt_state"][0]["mu"]["up"]["kernel"])[0].spec == plan.spec("up/kernel")
    with pytest.raises(tpflax.OptionError, match=r"optimizer 'adamw' has no init\(\); pass an optax"):
        tpflax.optimizer_shardings("adamw", plan, mesh)


@pytest.mark.parametrize("batch,words", [
    (True, "batch=True is not a positive whole number of examples"),
    ((True, 16), r"batch=\(True, 16\) holds a dim that is not a positive whole number"),
    ({}, "the batch has no array leaves"),
])
def test_a_bool_or_empty_batch_is_refused_not_read_as_one_example(batch, words):
    # True was read as one example and {} as a batch of 1 ("the global batch 1 does not divide over data=2"),
    # (True, 16) as "the global batch True"
    plan = tpflax.plan({"w": np.ones((8, 16), np.float32)}, {"data": 2, "model": 4})
    with pytest.raises(tpflax.EstimateError, match=words) as e:
        tpflax.estimate(plan, None, batch)
    assert "does not divide" not in str(e.value)


def test_a_bad_min_channels_is_answered_with_a_channel_count():
    # the example given was the byte threshold's: "min_channels=-1 must be a non-negative number, e.g.
    # min_channels=262144" (a quarter of a million channels; the default is 64)
    with pytest.raises(tpflax.OptionError) as e:
        tpflax.plan({"w": np.ones((8, 16), np.float32)}, {"model": 4}, min_channels=-1, fsdp_min_bytes=-2)
    assert "min_channels=-1 must be a non-negative number, e.g. min_channels=64" in e.value.problems
    assert "fsdp_min_bytes=-2 must be a non-negative number, e.g. fsdp_min_bytes=262144" in e.value.problems


@pytest.mark.parametrize("explicit", [("data", "model"), ("data",)])
def test_constrain_and_constrain_batch_take_a_mesh_with_explicit_axes(explicit):
    # jax's explicit sharding mode: with_sharding_constraint refuses a spec naming an Explicit axis ("can only
    # refer to Auto axes of the mesh. ... You probably meant to use `reshard` API?"), and both raised that raw
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    types = tuple(AxisType.Explicit if a in explicit else AxisType.Auto for a in ("data", "model"))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=types)
    params = {"up": {"kernel": np.arange(32 * 64, dtype=np.float32).reshape(32, 64)},
              "down": {"kernel": np.arange(64 * 32, dtype=np.float32).reshape(64, 32)}}
    plan = tpflax.plan(params, mesh, rules=[("up", "column"), ("down", "row")])
    whole = jax.device_put(params, NamedSharding(mesh, P()))
    out = jax.jit(lambda t: tpflax.constrain(t, plan, mesh))(whole)
    for path, want in (("up", P(None, "model")), ("down", P("model", None))):
        got = out[path]["kernel"]
        assert got.sharding.is_equivalent_to(NamedSharding(mesh, want), 2), (path, got.sharding)
        np.testing.assert_array_equal(np.asarray(got), params[path]["kernel"])
    batch = jax.device_put(np.arange(24, dtype=np.float32).reshape(8, 3), NamedSharding(mesh, P()))
    got = jax.jit(lambda b: tpflax.constrain_batch(b, mesh))(batch)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2), got.sharding
    np.testing.assert_array_equal(np.asarray(got), np.arange(24).reshape(8, 3))


def test_rules_given_as_a_string_a_compiled_regex_or_an_unconstrained_entry():
    # rules="w=column" was iterated by character (ten "'w' is not a (regex, ...) pair" problems); a compiled
    # regex was "not a pair"; P.UNCONSTRAINED was a bare TypeError ("'UnconstrainedSingleton' object is not
    # iterable"); trainable=3 was flax's ValueError "Invalid format specifier '!r' for object of type 'int'"
    from jax.sharding import PartitionSpec as P

    tree = {"w": np.ones((8, 16), np.float32), "b": np.ones(16, np.float32)}
    with pytest.raises(tpflax.RuleError, match=r"rules='w=column' is not a list of \(regex, target\) pairs") as e:
        tpflax.plan(tree, {"model": 4}, rules="w=column")
    assert not e.value.problems
    p = tpflax.plan(tree, {"model": 4}, rules=[(re.compile(r"^w$"), P(None, "model"))])
    assert p.spec("w") == P(None, "model") and tpflax.Plan.from_json(p.to_json()).spec("w") == P(None, "model")
    with pytest.raises(tpflax.RuleError) as e:
        tpflax.plan(tree, {"model": 4}, rules=[("w", P(None, P.UNCONSTRAINED))])
    assert e.value.problems[0].startswith("rule 0 ('w'): spec entry UNCONSTRAINED is not a mesh axis name")
    with pytest.raises(tpflax.OptionError, match=r"trainable=3 is neither a regex nor an nnx filter"):
        tpflax.plan(tree, {"model": 4}, trainable=3)


def test_the_batch_and_the_mesh_swapped_are_named_as_swapped():
    # batch_sharding takes (mesh, batch), shard_batch and constrain_batch (batch, mesh): swapped, the batch was
    # read as a mesh and the whole array printed ("axis 'x' has size array([[1., 1., 1.], ...") or jax failed
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    batch = {"x": np.ones((8, 3), np.float32)}
    calls = {"batch_sharding(mesh, batch)": lambda: tpflax.batch_sharding(batch, mesh),
             "shard_batch(batch, mesh)": lambda: tpflax.shard_batch(mesh, batch),
             "constrain_batch(batch, mesh)": lambda: jax.jit(lambda b: tpflax.constrain_batch(mesh, b))(batch)}
    for right, call in calls.items():
        with pytest.raises(tpflax.OptionError, match=rf"the batch and the mesh are swapped; pass them as "
                                                     rf"{re.escape(right)}"):
            call()
    with pytest.raises(tpflax.MeshError) as e:
        tpflax.make_mesh({"x": np.ones((8, 3))})
    assert e.value.problems == ("axis 'x' has size ndarray of shape (8, 3); sizes must be integers >= 1",)


def test_shard_and_unshard_inside_jit_say_what_to_do_there():
    # both raised jax's ConcretizationTypeError "The is_deleted() method was called on traced array"
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    params = {"w": np.ones((8, 8), np.float32)}
    plan = tpflax.plan(params, mesh)
    with pytest.raises(tpflax.TreeError, match=r"holds traced values .* cannot be placed: inside a jitted function "
                                               r"lay values out with tpflax.constrain\(tree, plan, mesh\)") as e:
        jax.jit(lambda p: tpflax.shard(p, plan, mesh))(params)
    assert e.value.problems == ("w: traced float32[8,8]",)
    with pytest.raises(tpflax.TreeError, match=r"cannot be read back: call it on the jitted function's output"):
        jax.jit(lambda p: tpflax.unshard(p))(params)
    with pytest.raises(tpflax.TreeError, match=r"the batch holds traced values"):
        jax.jit(lambda b: tpflax.shard_batch(b, mesh))({"x": np.ones((8, 3), np.float32)})


def _mlp_tree(width=32, hidden=128):
    return {"params": {"mlp": {"up": {"kernel": jax.ShapeDtypeStruct((width, hidden), "float32")},
                               "down": {"kernel": jax.ShapeDtypeStruct((hidden, width), "float32")}}}}


def test_report_refuses_an_estimate_made_for_another_tree_or_plan():
    # only the mesh was checked: an estimate of another tree (or of the same tree planned otherwise) on the same
    # mesh was printed under this plan's table, its memory and collectives another plan's
    mesh = {"data": 2, "model": 4}
    plan = tpflax.plan(_mlp_tree(), mesh)
    other = tpflax.plan(_mlp_tree(64, 256), mesh)
    est = tpflax.estimate(other, optax.sgd(0.1), {"x": (8, 32)})
    for fmt in ("text", "json", "html"):
        with pytest.raises(tpflax.PlanMismatchError, match="made for another plan") as e:
            tpflax.report(plan, est, fmt=fmt)
    assert "params/mlp/up/kernel: float32[32, 128] P(None, 'model') in the plan, priced as " \
           "float32[64, 256] P(None, 'model')" in e.value.problems
    replicated = tpflax.plan(_mlp_tree(), mesh, rules=[("mlp", "replicate")])
    with pytest.raises(tpflax.PlanMismatchError, match="made for another plan") as e:
        tpflax.report(plan, tpflax.estimate(replicated, optax.sgd(0.1), {"x": (8, 32)}))
    assert e.value.problems[0].endswith("priced as float32[128, 32] P(None, None)")
    extra = tpflax.plan({**_mlp_tree(), "head": {"kernel": jax.ShapeDtypeStruct((32, 8), "float32")}}, mesh)
    with pytest.raises(tpflax.PlanMismatchError) as e:
        tpflax.report(plan, tpflax.estimate(extra, optax.sgd(0.1), {"x": (8, 32)}))
    assert e.value.problems == ("head/kernel: priced, not in the plan",)
    # the same tree with the up projection frozen: its estimate holds no gradient or moments of it
    frozen = tpflax.plan(_mlp_tree(), mesh, trainable="down")
    with pytest.raises(tpflax.PlanMismatchError) as e:
        tpflax.report(plan, tpflax.estimate(frozen, optax.sgd(0.1), {"x": (8, 32)}))
    assert e.value.problems == ("params/mlp/up/kernel: float32[32, 128] P(None, 'model') in the plan, priced as "
                                "float32[32, 128] P(None, 'model') frozen",)
    # its own estimate, and the plan reloaded from JSON, still report
    own = tpflax.estimate(plan, optax.sgd(0.1), {"x": (8, 32)})
    assert "estimate per training step" in tpflax.report(plan, own)
    assert "estimate per training step" in tpflax.report(tpflax.Plan.from_json(plan.to_json()), own)


def test_the_peak_says_how_its_saved_activations_follow_from_the_activations_row():
    # the memory table's activations row (every layer's output) and the peak's "saved activations" (what the step
    # keeps) differed without a word (tiny llama on TPU: 688.0 KiB beside 400.0 KiB)
    model = zoo.get("llama")
    plan = tpflax.plan(model.abstract_variables(), {"data": 2, "model": 4})
    batch = jax.eval_shape(lambda: model.make_batch(0, 8))
    for backend in ("tpu", "cpu"):
        est = tpflax.estimate(plan, optax.adamw(1e-3), batch, model=model, backend=backend)
        b = est.breakdown
        assert b.activations != est.per_device.activations
        assert b.activations == est.per_device.activations + sum(t for _, t in b.saved_terms)
        lines = est.report_lines()
        at = next(i for i, line in enumerate(lines) if line.strip().startswith("saved activations"))
        assert lines[at + 1].strip().startswith(f"= activations row {tpflax.fmt_bytes(est.per_device.activations)}")
        for name, t in b.saved_terms:
            assert f"{'-' if t < 0 else '+'} {tpflax.fmt_bytes(abs(t))} {name}" in lines[at + 1]
        assert est.to_dict()["peak_breakdown"]["saved_terms"] == dict(b.saved_terms)
    assert "row outputs freed at their residual add" in dict(
        tpflax.estimate(plan, optax.adamw(1e-3), batch, model=model).breakdown.saved_terms)


def test_shard_batch_of_an_abstract_batch_says_to_take_its_shardings():
    # jax's bare "InvalidInputException: Argument of type <class 'jax.ShapeDtypeStruct'> is not a valid JAX type",
    # with no path; shard() says the same of an abstract tree in its own words
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    batch = {"x": np.ones((8, 4), np.float32), "y": jax.ShapeDtypeStruct((8,), "int32")}
    with pytest.raises(tpflax.TreeError, match=r"1 batch leaves are abstract \(jax.ShapeDtypeStruct, e.g. y\)") as e:
        tpflax.shard_batch(batch, mesh)
    assert "tpflax.batch_sharding(mesh, batch)" in str(e.value)
    assert tpflax.batch_sharding(mesh, batch)["y"].spec == jax.sharding.PartitionSpec("data")


def test_numpy_integer_batches_and_device_counts_are_counts():
    # np.int64(8) (from np.prod, a config loaded with numpy) was read as an array leaf of shape (): a batch of
    # one example ("the global batch 1 does not divide over data=2"), a plan priced for 1 token, and
    # suggest_mesh refused np.int64(8) devices ("devices must be a positive integer, got np.int64(8)")
    model = zoo.get("llama")
    plan = tpflax.plan(model.abstract_variables(), {"data": 2, "model": 4})
    want = tpflax.estimate(plan, optax.adam(1e-3), 8, model=model)
    for batch in (np.int64(8), (np.int64(8), np.int32(32)), [np.int64(8)]):
        est = tpflax.estimate(plan, optax.adam(1e-3), batch, model=model)
        assert est.batch == want.batch and est.per_device == want.per_device, batch
    assert tpflax.estimate(plan, None, {"x": (np.int64(8), 32)}).batch["size"] == 8
    tree = model.abstract_variables()
    assert tpflax.plan(tree, {"model": 8}, batch=(np.int64(8), 32)).options["tokens"] == 256
    a = tpflax.suggest_mesh(model, np.int64(8), "1GiB", batch=np.int64(8))
    b = tpflax.suggest_mesh(model, 8, "1GiB", batch=8)
    assert [c.mesh for c in a.ranked] == [c.mesh for c in b.ranked] and a.settings["batch"] == b.settings["batch"]


def test_a_batch_of_no_examples_is_refused():
    # a batch tree with a leading dim of 0 (an empty shard of a loader, `tpflax diff --batch 0x32`) was priced: the
    # estimate's collectives and activations those of no examples, without a word (diff: "76.8 KiB -> 0 B")
    model = zoo.get("mlp")
    plan = tpflax.plan(model.abstract_variables(), {"data": 2, "model": 4})
    for batch in ({"x": jax.ShapeDtypeStruct((0, 32), "float32")}, {"x": np.ones((0, 32), np.float32)}):
        with pytest.raises(tpflax.EstimateError, match=r"no examples: its leaf x has shape \(0, 32\)"):
            tpflax.estimate(plan, optax.adam(1e-3), batch)
    with pytest.raises(tpflax.EstimateError, match="no examples"):
        tpflax.estimate(plan, optax.adam(1e-3), model=model, sample=(jax.ShapeDtypeStruct((0, 32), "float32"),))
    with pytest.raises(tpflax.EstimateError, match="no examples"):
        tpflax.diff(plan, plan, optimizer=optax.adam(1e-3), batch={"x": jax.ShapeDtypeStruct((0, 32), "int32")})


def test_optimizer_state_calls_with_arguments_swapped_say_the_order():
    # shard_optimizer_state(opt, state, mesh, plan) was a bare "AttributeError: 'Mesh' object has no attribute
    # 'decisions'" (optimizer_shardings: "... no attribute 'specs'"), and a state given first printed the whole
    # state, arrays and all, as "optimizer (ScaleByAdamState(count=Array(0, ...), mu={...: Array([[0., ..."
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    params = {"mlp": {"up": {"kernel": np.ones((32, 128), np.float32)}, "down": {"kernel": np.ones((128, 32), np.float32)}}}
    plan = tpflax.plan(params, mesh)
    opt = optax.adam(1e-3)
    state = opt.init(params)
    order = "the order is shard_optimizer_state(optimizer, opt_state, plan, mesh)"
    with pytest.raises(tpflax.OptionError, match="plan is a Mesh, not a tpflax.Plan") as e:
        tpflax.shard_optimizer_state(opt, state, mesh, plan)
    assert order in str(e.value)
    with pytest.raises(tpflax.OptionError, match=r"plan is a Mesh.*the order is optimizer_shardings\(optimizer, plan"):
        tpflax.optimizer_shardings(opt, mesh, plan)
    with pytest.raises(tpflax.OptionError, match="optimizer a tuple has no init.*the arguments swapped") as e:
        tpflax.shard_optimizer_state(state, opt, plan, mesh)
    assert order in str(e.value) and "Array(" not in str(e.value)
    with pytest.raises(tpflax.OptionError, match="optimizer a tuple has no init") as e:
        tpflax.optimizer_shardings(state, plan, mesh)
    assert "Array(" not in str(e.value)


def test_dry_run_with_plan_and_mesh_swapped_says_the_order():
    # "MeshError: cannot read a mesh from Plan; pass a dict like {'data': 2, 'model': 4}, ...": the plan was read as
    # the mesh, and the message asked for a mesh where one had been given
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    plan = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, mesh)
    with pytest.raises(tpflax.OptionError, match=r"plan is a Mesh, not a tpflax.Plan.*dry_run\(step, plan, mesh\)"):
        tpflax.dry_run(lambda w: w, mesh, plan)


def test_estimate_remat_is_a_bool():
    # remat="false" (a config's text, a CLI value passed through) was read as truthy: the estimate of a remat'd step
    model = zoo.get("llama")
    plan = tpflax.plan(model.abstract_variables(), {"data": 2, "model": 4})
    for remat in ("false", "yes", None, 1):
        with pytest.raises(tpflax.EstimateError, match=f"remat={remat!r} must be True or False"):
            tpflax.estimate(plan, optax.adam(1e-3), 8, model=model, remat=remat)
    with pytest.raises(tpflax.EstimateError, match="remat=.false. must be True or False"):  # as its other options
        tpflax.suggest_mesh(model, 8, "1GiB", remat="false")
    assert tpflax.estimate(plan, None, 8, model=model, remat=np.bool_(True)).settings["remat"]


def test_plan_reads_logical_rules_as_a_dict_and_refuses_a_bool_batch():
    # logical_rules=3 was a bare "TypeError: 'int' object is not iterable", a {name: axes} dict (as rules= takes
    # {regex: target}) a "not a pair" problem per key; plan(batch=True) was priced as one token, as estimate refuses
    import flax.linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (32, 128))

    v = jax.eval_shape(M().init, jax.random.key(0), jax.ShapeDtypeStruct((8, 32), "float32"))
    mesh = {"data": 2, "model": 4}
    listed = tpflax.plan(v, mesh, logical_rules=[("mlp", "model"), ("embed", None)])
    assert tpflax.plan(v, mesh, logical_rules={"mlp": "model", "embed": None}).decisions == listed.decisions
    assert listed.decisions["params/w"].spec == jax.sharding.PartitionSpec(None, "model")
    for bad in (3, "mlp=model"):
        with pytest.raises(tpflax.RuleError, match=f"logical_rules={bad!r} is not a sequence of"):
            tpflax.plan(v, mesh, logical_rules=bad)
    for batch in (True, 0, 8.5):
        with pytest.raises(tpflax.OptionError, match=rf"plan\(batch={batch!r}\): .*not a positive whole number"):
            tpflax.plan(v, mesh, batch=batch)


def test_plan_byte_thresholds_take_sizes_as_text():
    # plan(device_memory="16GB") took text while fsdp_min_bytes="1MiB" in the same call was "must be a
    # non-negative number", and the CLI reads both as sizes
    tree = zoo.get("llama").abstract_variables()
    by_number = tpflax.plan(tree, {"fsdp": 8}, fsdp_min_bytes=1 << 14, tensor_min_bytes=0)
    by_text = tpflax.plan(tree, {"fsdp": 8}, fsdp_min_bytes="16KiB", tensor_min_bytes="0")
    assert by_text.decisions == by_number.decisions and by_text.options == by_number.options
    assert by_text.options["fsdp_min_bytes"] == 16384
    with pytest.raises(tpflax.OptionError, match=r"fsdp_min_bytes='lots' must be a non-negative number of bytes or a "
                                                 r"size such as '256KiB'"):
        tpflax.plan(tree, {"fsdp": 8}, fsdp_min_bytes="lots")


def test_unshard_and_make_train_step_with_a_mesh_for_the_plan_say_so():
    """``unshard(tree, mesh)`` and ``make_train_step(model, mesh, plan, tx)`` raised bare AttributeErrors from
    deep inside; each says what it takes, and in which order."""
    m = zoo.get("mlp")
    plan = tpflax.plan(m.abstract_variables(), {"model": 2})
    mesh = tpflax.make_mesh({"model": 2})
    with pytest.raises(tpflax.OptionError, match=r"unshard needs no mesh"):
        tpflax.unshard({"w": np.ones(3)}, mesh)
    with pytest.raises(tpflax.OptionError, match=r"plan is a Mesh, not a tpflax.Plan.*model, plan, mesh, optimizer"):
        tpflax.make_train_step(m, mesh, plan, optax.sgd(0.1))


def test_a_mesh_string_takes_spaces_around_its_equals_signs():
    # " model = 2 " gave three "not name=size" problems ('model', '=', '2')
    assert tpflax.plan({"w": np.ones((8, 4))}, " data = 2 , model = 4 ").mesh.sizes == {"data": 2, "model": 4}
    assert tpflax.plan({"w": np.ones((8, 4))}, "data : 2 model=4").mesh.sizes == {"data": 2, "model": 4}


@pytest.mark.parametrize("text,where", [("data=2,,model=4", "has two commas with no axis between them"),
                                        ("data=2,", "ends with a comma"), (",model=4", "starts with a comma"),
                                        ("data=2, ,model=4", "has two commas")])
def test_a_mesh_string_with_an_empty_axis_is_refused(text, where, capsys):
    # the empty piece was dropped: "data=2,,model=4" made a data=2,model=4 mesh, "data=2," a data=2 one, silently
    from tpflax.cli import main

    with pytest.raises(tpflax.MeshError, match=rf"cannot parse mesh '{re.escape(text)}': it {where}"):
        tpflax.make_mesh(text)
    with pytest.raises(tpflax.MeshError, match="comma"):
        tpflax.plan({"w": np.ones((8, 4))}, text)
    assert main(["plan", "mlp", "--mesh", text]) == 2
    assert f"cannot parse mesh '{text}'" in capsys.readouterr().err


def test_make_train_step_takes_a_numpy_integer_batch_size():
    # np.int64(8) was read as an abstract batch of one 0-d leaf for a zoo model (the step's batch argument a
    # scalar), and refused as "batch=int64 is only for zoo models" for any other model
    from flax import nnx

    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    m = zoo.get("mlp")
    plan = tpflax.plan(m.abstract_variables(), mesh)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), tpflax.make_train_step(m, plan, mesh, optax.sgd(0.1), 8).args[2])
    for batch in (np.int64(8), np.int32(8), (np.int64(8), 32)):
        got = tpflax.make_train_step(m, plan, mesh, optax.sgd(0.1), batch=batch).args[2]
        assert jax.tree.map(lambda x: (x.shape, x.dtype), got) == want, batch

    class Lin(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 8, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

    mod = Lin(nnx.Rngs(0))
    plan = tpflax.plan(nnx.state(mod), mesh)
    sample = (jax.ShapeDtypeStruct((2, 4), "float32"),)
    step = tpflax.make_train_step(mod, plan, mesh, optax.sgd(0.1), batch=np.int64(8), sample=sample,
                                  loss=lambda out, x: (out ** 2).mean())
    assert [x.shape for x in jax.tree.leaves(step.args[2])] == [(8, 4)]


def test_batch_leaves_disagreeing_on_the_batch_size_are_named():
    # {"x": 8 examples, "y": 16 labels} was given one sharding per leaf, each split as if it held the batch:
    # the mismatch surfaced (if at all) deep in the user's step
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    batch = {"x": np.ones((8, 3), np.float32), "y": np.ones((16,), np.int32), "step": 3}
    calls = (lambda b: tpflax.batch_sharding(mesh, b), lambda b: tpflax.shard_batch(b, mesh),
             lambda b: jax.jit(lambda t: tpflax.constrain_batch(t, mesh))(b))
    for call in calls:
        with pytest.raises(tpflax.TreeError, match=r"disagree on the batch \(leading\) size: x has 8 examples "
                                                   r"\(shape \(8, 3\)\) but y has 16 \(shape \(16,\)\)"):
            call(batch)
    abstract = {"a": jax.ShapeDtypeStruct((4, 2), "float32"), "b": jax.ShapeDtypeStruct((8, 2), "float32")}
    with pytest.raises(tpflax.TreeError, match="a has 4 examples .* but b has 8"):
        tpflax.batch_sharding(mesh, abstract)
    # agreeing leaves, scalars and None leaves pass as before
    ok = tpflax.shard_batch({"x": np.ones((8, 3)), "y": np.ones(8), "step": 3, "n": None}, mesh)
    assert ok["y"].sharding.spec == jax.sharding.PartitionSpec("data")


def test_estimate_says_what_activations_takes():
    # {"x": 3} was a bare TypeError ("'int' object is not iterable") from deep in the pricing, a list an
    # AttributeError ("'list' object has no attribute 'get'")
    model = zoo.get("mlp")
    plan = tpflax.plan(model.abstract_variables(), {"data": 2, "model": 4})
    how = r"activations= takes what tpflax.trace_activations\(model, batch\) returns"
    for bad, problem in (({"x": 3}, "x: 3 (int) is not a list of Act"), ({"x": [(8, 256)]}, "x: holds (8, 256)"),
                         ({0: []}, "key 0 (int) is not a layer path"), ([1, 2], None), ("up", None)):
        with pytest.raises(tpflax.EstimateError, match=how) as e:
            tpflax.estimate(plan, optax.sgd(0.1), 8, model=model, activations=bad)
        assert problem is None or e.value.problems[0].startswith(problem), e.value.problems
    acts = tpflax.trace_activations(model, 8)
    assert tpflax.estimate(plan, optax.sgd(0.1), 8, model=model, activations=acts).per_device == \
        tpflax.estimate(plan, optax.sgd(0.1), 8, model=model).per_device


def test_report_takes_a_suggested_candidates_estimate_and_refuses_what_is_no_estimate():
    # report(plan, x) showed any x with report_lines as the estimate (a Suggestion's ranking, a DryRun under the
    # estimate's heading) and dropped any other x without a word (a candidate, estimate.to_dict())
    s = tpflax.suggest_mesh(zoo.get("mlp"), 8, "1GiB", batch=8, optimizer=optax.adam(1e-3))
    best, second = s[0], s[1]
    own = tpflax.report(best.plan, best.estimate, reasons=False)
    assert "estimate per training step" in own
    assert tpflax.report(best.plan, best, reasons=False) == own
    assert best.estimate.made_for and best.estimate.peak == best.peak and best.estimate.comm == best.comm
    with pytest.raises(tpflax.PlanMismatchError, match=f"made for mesh {second.mesh}"):
        tpflax.report(best.plan, second)
    for bad, words in ((s, r"not Suggestion \(take a candidate's"), (best.estimate.to_dict(), "not dict")):
        with pytest.raises(tpflax.OptionError, match=r"estimate= takes tpflax.estimate\(plan, ...\)'s result .*"
                                                     + words):
            tpflax.report(best.plan, bad)
    with pytest.raises(tpflax.OptionError, match=r"dry_run= takes .* not Estimate \(an Estimate goes in estimate=\)"):
        tpflax.report(best.plan, dry_run=best.estimate)


def test_editing_plan_specs_leaves_the_plan_as_it_was():
    # plan.specs was the plan's own tree: an edit of it (to tweak a layout for one's own jit) changed what
    # tpflax.shardings(plan, mesh) gave, while shard() and the estimate kept reading the decisions
    from jax.sharding import PartitionSpec as P

    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    tree = {"params": {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
                       "down": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}}}
    plan = tpflax.plan(tree, mesh)
    want = plan.spec("params/up/kernel")
    assert want != P()
    specs = plan.specs
    specs["params"]["up"]["kernel"] = P()
    del specs["params"]["down"]
    assert plan.specs["params"]["up"]["kernel"] == want and "down" in plan.specs["params"]
    assert tpflax.shardings(plan, mesh)["params"]["up"]["kernel"].spec == want
    assert tpflax.Plan.from_json(plan.to_json()).specs == plan.specs


def test_a_dict_with_keys_of_mixed_types_is_named():
    # jax cannot sort {0: ..., "a": ...}: plan, shard and suggest_mesh raised jax's bare "ValueError: Comparator
    # raised exception while sorting pytree dictionary keys" with no path
    tree = {"params": {"emb": {0: np.ones((8, 4), np.float32), "a": np.ones((8, 4), np.float32)}}}
    with pytest.raises(tpflax.TreeError, match=r"params/emb has keys of types int, str, which jax cannot sort"):
        tpflax.plan(tree, {"model": 2})
    with pytest.raises(tpflax.TreeError, match="params/emb has keys of types int, str"):
        tpflax.suggest_mesh(tree, 2, "1GiB")


def test_init_sharded_takes_python_values_among_its_positional_arguments():
    # init_sharded(f, plan, mesh, key, 16): the 16 was traced, and jax's bare TypeError ("Shapes must be 1D
    # sequences of concrete values of integer type") came from inside tpflax's jit; kwargs were static already
    import flax.linen as nn

    model = nn.Dense(8)

    def init(key, width, scale, name):
        assert isinstance(width, int) and scale == 1.0 and name == "w"
        return model.init(key, jax.numpy.ones((2, width)))

    mesh = tpflax.make_mesh({"model": 2})
    plan = tpflax.plan(jax.eval_shape(model.init, jax.random.key(0), jax.numpy.ones((2, 4))), mesh,
                       rules=[("kernel", "column")])
    got = tpflax.init_sharded(init, plan, mesh, jax.random.key(0), 4, 1.0, "w")
    want = model.init(jax.random.key(0), jax.numpy.ones((2, 4)))
    assert got["params"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


def test_dry_run_says_what_example_args_are():
    # with a TrainStep, example_args were ignored: a batch of 16 given, the step's own 8 compiled, without a
    # word; the variables dict given alone was read as its keys ("<batch>: leaf of type str is not an array")
    m = zoo.get("mlp")
    plan = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4})
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    ts = tpflax.make_train_step(m, plan, mesh, optax.sgd(0.1), 8)
    other = tpflax.make_train_step(m, plan, mesh, optax.sgd(0.1), 16).args
    with pytest.raises(tpflax.OptionError, match="a TrainStep carries its own arguments"):
        tpflax.dry_run(ts, plan, mesh, other)
    from tpflax._src.dryrun import _check_example_args

    _check_example_args(ts, None)  # no arguments, as (): was len(None), a bare TypeError
    with pytest.raises(tpflax.OptionError, match=r"example_args is the step's positional arguments in a tuple.*not a "
                                                 r"dict; for a step of one argument pass \(tree,\)"):
        tpflax.dry_run(lambda v: v, plan, mesh, m.abstract_variables())


def test_unshard_gives_arrays_one_may_edit():
    # the gathered arrays were jax's read-only host copies: editing one ("params['w'][0] = 0", as one edits a
    # numpy tree) was numpy's bare "assignment destination is read-only"; a numpy leaf came back writable
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    tree = {"w": np.arange(64 * 256, dtype=np.float32).reshape(64, 256), "b": np.ones(3, np.float32)}
    plan = tpflax.plan(tree, mesh, rules=[("w", (None, "model"))])
    placed = tpflax.shard(tree, plan, mesh)
    back = tpflax.unshard(placed, plan)
    back["w"][0, 0] = -1.0
    back["b"][0] = -1.0
    # the placed arrays, and what they read back as, are untouched
    assert float(placed["w"][0, 0]) == 0.0 and float(placed["b"][0]) == 1.0
    again = tpflax.unshard(placed, plan)
    assert np.array_equal(again["w"], tree["w"]) and np.array_equal(again["b"], tree["b"])


def test_a_rule_targeting_a_bare_axis_name_says_how_a_spec_names_it():
    # ("up/kernel", "model") said only "strategy 'model' is unknown", as if no axis of that name existed
    tree = {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")}}
    with pytest.raises(tpflax.RuleError, match=r"strategy 'model' is unknown; .*\('model' is a mesh axis: a spec "
                                               r"names one per dim, e.g. P\(None, 'model'\)"):
        tpflax.plan(tree, {"data": 2, "model": 4}, rules=[("up/kernel", "model")])
    with pytest.raises(tpflax.RuleError) as e:
        tpflax.plan(tree, {"data": 2, "model": 4}, rules=[("up/kernel", "colum")])
    assert "mesh axis" not in str(e.value)


def test_estimate_with_the_batch_where_the_optimizer_goes_says_the_order():
    # estimate(plan, 8) said "estimate needs a batch"; estimate(plan, batch, tx) "'dict' object has no attribute
    # 'init'"
    plan = tpflax.plan({"w": jax.ShapeDtypeStruct((64, 256), "float32")}, {"data": 2, "model": 4})
    for optimizer in (8, np.int64(8), (8, 64), "8x64", {"x": (8, 64)}):
        with pytest.raises(tpflax.EstimateError, match=r"looks like a batch: the order is estimate\(plan, optimizer, "
                                                       r"batch\)"):
            tpflax.estimate(plan, optimizer)
    with pytest.raises(tpflax.EstimateError, match=r"the optimizer and the batch are swapped"):
        tpflax.estimate(plan, {"x": (8, 64)}, optax.adam(1e-3))
    # an optimizer's name (as the command line takes it) is no batch: "'str' object has no attribute 'init'"
    for batch in (None, {"x": (8, 64)}):
        with pytest.raises(tpflax.EstimateError, match=r"optimizer 'adamw' is a name: pass the optax optimizer "
                                                       r"itself, e.g. optax.adamw\(1e-3\)"):
            tpflax.estimate(plan, "adamw", batch)
    assert tpflax.estimate(plan, None, {"x": (8, 64)}).per_device.opt_state == 0


def test_plan_with_the_mesh_first_says_the_order():
    # plan(mesh, tree) read the tree as a mesh: "axis 'params' has size {'up': ...}; sizes must be integers >= 1"
    tree = {"params": {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")}}}
    for mesh in (tpflax.make_mesh({"data": 2, "model": 4}), "data=2,model=4", {"data": 2, "model": 4},
                 jax.sharding.AbstractMesh((2, 4), ("data", "model"))):
        with pytest.raises(tpflax.OptionError, match=r"the tree is a mesh .*: the order is plan\(tree, mesh\)"):
            tpflax.plan(mesh, tree)
        assert list(tpflax.plan(tree, mesh).decisions) == ["params/up/kernel"]
    with pytest.raises(tpflax.OptionError, match=r"the tree is the string 'gpt2'.*zoo.get\('gpt2'\)"):
        tpflax.plan("gpt2", {"model": 2})


@pytest.mark.parametrize("stacked", ["", ":1", {"": 0}])
def test_an_empty_stacked_regex_is_refused(stacked):
    # stacked="" (a config's empty default) matched every leaf: each kernel was read as a stack of rows and the
    # plan replicated them all, its only word an idle-axis warning
    tree = {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
            "down": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}}
    with pytest.raises(tpflax.RuleError, match=r"has an empty regex, which matches every leaf; pass None"):
        tpflax.plan(tree, {"data": 2, "model": 4}, stacked=stacked)
    assert tpflax.plan(tree, {"data": 2, "model": 4}).spec("up/kernel") == jax.sharding.PartitionSpec(None, "model")


def test_a_path_under_its_collection_names_the_leaf_as_the_report_prints_it():
    # plan.spec("up/kernel") on a linen plan raised "not a leaf of this plan" though the report's table prints it so
    # (under the common params/ root); a mistyped one suggested nothing for the path as printed
    import flax.linen as nn

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="down")(nn.relu(nn.Dense(64, name="up")(x)))

    variables = jax.eval_shape(Mlp().init, jax.random.key(0), jax.ShapeDtypeStruct((4, 16), "float32"))
    plan = tpflax.plan(variables, {"data": 2, "model": 4})
    assert "paths under params/" in tpflax.report(plan)
    assert plan.spec("up/kernel") == plan.spec("params/up/kernel") == jax.sharding.PartitionSpec(None, "model")
    assert plan.decisions["down/bias"] is plan.decisions["params/down/bias"]
    with pytest.raises(tpflax.UnknownPathError, match=r"'up/kernal' is not a leaf of this plan; did you mean "
                                                      r"'params/up/kernel'"):
        plan.spec("up/kernal")
    # under two roots (a copy of the parameters kept beside them) it is ambiguous: both named, the fix said
    two = tpflax.plan({"params": variables["params"], "ema": variables["params"]}, {"data": 2, "model": 4})
    with pytest.raises(tpflax.UnknownPathError, match=r"'up/kernel' is not a leaf of this plan and names more than "
                                                      r"one leaf under its first path component: 'ema/up/kernel' or "
                                                      r"'params/up/kernel'; give the full path"):
        two.spec("up/kernel")
    assert two.decisions.get("up/kernel") is None and "up/kernel" not in two.decisions  # a dict's get and in


def test_axis_roles_given_as_a_string_says_it_takes_a_mapping():
    # axis_roles="x=tensor" (as the command line's --axis-role writes it) was dict()'s bare ValueError
    # ("dictionary update sequence element #0 has length 1; 2 is required")
    tree = {"w": jax.ShapeDtypeStruct((64, 256), "float32")}
    for roles in ("x=tensor", 3):
        with pytest.raises(tpflax.MeshError, match=r"is not a mapping of axis name to role; write e.g. "
                                                   r"axis_roles=\{'x': 'tensor'"):
            tpflax.plan(tree, {"x": 4}, axis_roles=roles)
    assert tpflax.plan(tree, {"x": 4}, axis_roles=[("x", "tensor")]).mesh.roles == (("x", "tensor"),)


def test_make_train_step_takes_a_mesh_shape_and_dry_run_compiles_an_abstract_mesh_step():
    # make_train_step(model, plan, {"data": 2, "model": 4}, tx) was a bare AttributeError ("'dict' object has no
    # attribute 'size'"); a step made on an AbstractMesh was refused by jax at lowering ("Passing
    # lowering_platforms ... is required when only AbstractMesh exists")
    m = zoo.get("mlp")
    plan = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4})
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    for shape in ({"data": 2, "model": 4}, "data=2,model=4"):
        ts = tpflax.make_train_step(m, plan, shape, optax.sgd(0.1), 8)
        assert ts.in_shardings[0]["params"]["block_0"]["mlp"]["up"]["kernel"].mesh.shape == mesh.shape
    abstract = tpflax.make_train_step(m, plan, jax.sharding.AbstractMesh((2, 4), ("data", "model")), optax.sgd(0.1), 8)
    got = tpflax.dry_run(abstract, plan, mesh)
    want = tpflax.dry_run(tpflax.make_train_step(m, plan, mesh, optax.sgd(0.1), 8), plan, mesh)
    assert got.memory == want.memory and got.comm() == want.comm()


def test_an_nnx_optimizer_given_as_the_state_is_read_as_the_optimizer():
    # optimizer_shardings(tx, plan, mesh, opt_state=nnx_opt) and shard_optimizer_state(tx, nnx_opt, plan, mesh)
    # said "the state has 10 leaves; optimizer.init on the planned parameters makes 9"
    from flax import nnx

    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    model = nnx_mlp(32, 128)
    plan = tpflax.plan(model, mesh)
    tx = optax.adamw(1e-3)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    specs = lambda t: [s.spec for s in jax.tree_util.tree_leaves(  # noqa: E731
        t, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))]
    assert specs(tpflax.optimizer_shardings(tx, plan, mesh, opt_state=opt)) == specs(
        tpflax.optimizer_shardings(opt, plan, mesh))
    placed = tpflax.shard_optimizer_state(tx, opt, plan, mesh)
    assert isinstance(placed, nnx.Optimizer)
    assert [a.sharding.spec for a in jax.tree_util.tree_leaves(nnx.state(placed))] == specs(
        tpflax.optimizer_shardings(opt, plan, mesh))


def test_shard_batch_on_an_abstract_mesh_is_refused():
    # an AbstractMesh (a pod planned for, not here) was made into a mesh of this host's devices and the batch
    # placed there without a word, while shard() refuses one
    abstract = tpflax.make_mesh({"data": 2, "model": 4}).abstract_mesh
    with pytest.raises(tpflax.MeshError, match="AbstractMesh, which has no devices.*batch_sharding"):
        tpflax.shard_batch({"x": np.ones((8, 3), np.float32)}, abstract)
    # shard() raised a PlanMismatchError for the same mesh, shard_batch a MeshError: now one class, both of them,
    # whose message names the concrete mesh to build
    plan = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, abstract)
    for place in (lambda: tpflax.shard_batch({"x": np.ones((8, 3), np.float32)}, abstract),
                  lambda: tpflax.shard({"w": np.ones((8, 8), np.float32)}, plan, abstract)):
        with pytest.raises(tpflax.AbstractMeshError, match=r"tpflax\.make_mesh\(\{'data': 2, 'model': 4\}\)") as e:
            place()
        assert isinstance(e.value, tpflax.MeshError) and isinstance(e.value, tpflax.PlanMismatchError)
    spec = tpflax.batch_sharding(abstract, {"x": jax.ShapeDtypeStruct((8, 3), "float32")})["x"].spec
    assert spec == jax.sharding.PartitionSpec("data")


def test_an_input_of_another_leading_dim_than_the_batch_stays_replicated():
    # review_t F07: a step taking images (8, ...) and a positional table (16, d) shared by every example split the
    # table's leading 16 over data like a batch, and XLA all-gathered it back whole at every step (SAM2's pe)
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    class PosAdd(nn.Module):
        @nn.compact
        def __call__(self, img, pe):
            return nn.Dense(8, name="out")(img + pe.reshape(1, *pe.shape))

    S = jax.ShapeDtypeStruct
    img, pe = S((8, 16, 4), jnp.float32), S((16, 4), jnp.float32)
    model = PosAdd()
    v = jax.eval_shape(lambda a, b: model.init(jax.random.key(0), a, b), img, pe)
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    p = tpflax.plan(v, mesh)
    mse = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    # batch=8 says which is the batch: the table stays replicated, the images split
    ts = tpflax.make_train_step(model, p, mesh, optax.sgd(0.1), batch=8, sample=(img, pe), loss=mse)
    assert [s.spec for s in ts.in_shardings[2]] == [P("data"), P()]
    # an explicit spec always wins, with or without batch=
    given = S((16, 4), jnp.float32, sharding=NamedSharding(mesh, P(None, "model")))
    ts2 = tpflax.make_train_step(model, p, mesh, optax.sgd(0.1), sample=(img, given), loss=mse)
    assert [s.spec for s in ts2.in_shardings[2]] == [P("data"), P(None, "model")]
    # without either each input's leading dim is split (a dual encoder's 8 images and 16 captions), and it says so
    with pytest.warns(tpflax.TpflaxWarning, match=r"disagree on their leading dim .*pass batch=8"):
        ts3 = tpflax.make_train_step(model, p, mesh, optax.sgd(0.1), sample=(img, pe), loss=mse)
    assert [s.spec for s in ts3.in_shardings[2]] == [P("data"), P("data")]
    # the step runs with the table replicated, and matches the unsharded step
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=img.shape).astype(np.float32), rng.normal(size=pe.shape).astype(np.float32)
    vars0 = model.init(jax.random.key(0), x, t)
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings)
    placed = tpflax.shard(vars0, p, mesh)
    opt = tpflax.shard_optimizer_state(optax.sgd(0.1), None, p, mesh)
    batch = tpflax.shard_batch((x, t), mesh, batch_size=8)
    assert batch[1].sharding.spec == P()
    _, _, loss = step(placed, opt, batch)
    assert abs(float(loss) - float(mse(model.apply(vars0, x, t)))) < 1e-5


def test_batch_sharding_keeps_leaves_of_another_leading_dim_replicated_given_the_batch_size():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    S = jax.ShapeDtypeStruct
    batch = {"x": S((8, 3), "float32"), "y": S((8,), "int32"), "pe": S((16, 3), "float32"), "step": S((), "int32")}
    got = tpflax.batch_sharding(mesh, batch, batch_size=8)
    assert {k: s.spec for k, s in got.items()} == {"x": P("data"), "y": P("data"), "pe": P(), "step": P()}
    # without it the disagreement is refused, the message saying how to keep the table whole
    with pytest.raises(tpflax.TreeError, match=r"x has 8 examples .* but pe has 16 .* pass batch_size=8 to keep the leaves of another"):
        tpflax.batch_sharding(mesh, batch)
    # a leaf's explicit spec wins, and is left out of the disagreement check
    batch["pe"] = S((16, 4), "float32", sharding=NamedSharding(mesh, P(None, "model")))
    assert tpflax.batch_sharding(mesh, batch)["pe"].spec == P(None, "model")
    batch["pe"] = S((16, 3), "float32", sharding=NamedSharding(mesh, P(None, "model")))
    with pytest.raises(tpflax.SpecError) as e:
        tpflax.batch_sharding(mesh, batch)
    # checked by the one spec checker a plan's forced specs go through: the mesh axis, its size and the fix named
    assert list(e.value.problems) == ["pe: dim 1 of shape (16, 3) has size 3, not divisible by mesh axis model=4; "
                                      "shard another dim or leave dim 1 None"]
    batch["pe"] = S((16, 4), "float32", sharding=NamedSharding(tpflax.make_mesh({"data": 2, "tp": 4}), P(None, "tp")))
    with pytest.raises(tpflax.SpecError) as e:
        tpflax.batch_sharding(mesh, batch)
    assert list(e.value.problems) == [f"pe: spec {P(None, 'tp')} names mesh axis 'tp', but the mesh is "
                                      "data=2,model=4; use one of data, model"]
    # over Explicit axes every abstract value carries its type's sharding (jax.eval_shape's P(None, None)): no request
    explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    typed = {"x": S((8, 3), "float32", sharding=NamedSharding(explicit, P(None, None)))}
    assert tpflax.batch_sharding(explicit, typed)["x"].spec == P("data")
    # shard_batch and constrain_batch take it too
    arrays = {"x": np.ones((8, 3), np.float32), "pe": np.arange(48, dtype=np.float32).reshape(16, 3)}
    placed = tpflax.shard_batch(arrays, mesh, batch_size=8)
    assert placed["pe"].sharding.spec == P() and placed["x"].sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(placed["pe"]), arrays["pe"])
    out = jax.jit(lambda b: tpflax.constrain_batch(b, mesh, batch_size=8))(placed)
    assert out["pe"].sharding.spec == P()
    # a short last batch given the full batch size is refused, not replicated whole
    with pytest.raises(tpflax.TreeError, match=r"no batch leaf has batch_size=8 examples \(x has 7 \(shape \(7, 3\)\)\)"):
        tpflax.shard_batch({"x": np.ones((7, 3), np.float32)}, mesh, batch_size=8)
    for bad in (0, -8, 8.0, True, "8"):
        with pytest.raises(tpflax.OptionError, match="batch_size=.* must be a positive integer"):
            tpflax.batch_sharding(mesh, batch, batch_size=bad)


def test_show_and_report_take_a_suggest_mesh_candidate():
    # show(plan, candidate) was refused ("estimate must be a tpflax.Estimate ..., got Candidate") though
    # report(plan, candidate) took it; show(candidate) and report(candidate) were refused as no Plan
    tree = {"a": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
            "b": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}}
    s = tpflax.suggest_mesh(tree, 8, "16GiB", optimizer=optax.adam(1e-3), batch=(8, 64))
    c = s[0]
    for shown in (tpflax.show(c.plan, c), tpflax.show(c)):
        assert shown.plan is c.plan and shown.estimate is c.estimate
        assert 'data-chart="comm"' in shown._repr_html_()
    assert tpflax.report(c) == tpflax.report(c.plan, c.estimate)
    # a candidate of another mesh than the plan's: named, with what to pass
    other = next(x for x in s.ranked if x.mesh.sizes != c.mesh.sizes)
    for call in (tpflax.show, tpflax.report):
        with pytest.raises(tpflax.PlanMismatchError, match=r"the candidate was made for mesh .*, the plan is for .*: show the "
                                                            r"candidate's own layout with tpflax\.(show|report)\(candidate\)"):
            call(c.plan, other)
    with pytest.raises(tpflax.OptionError, match="estimate= takes tpflax.estimate"):
        tpflax.show(c.plan, s)


def test_a_part_of_the_planned_tree_is_told_how_to_place_it():
    # shard(nnx.state(model, nnx.Param), plan_of_the_model, mesh) said "re-plan or pass the full tree": re-planning
    # the module gives the same plan, and the part's leaves are exactly as planned
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    class M(nnx.Module):
        def __init__(self, rngs):
            self.l = nnx.Linear(16, 32, rngs=rngs)
            self.bn = nnx.BatchNorm(32, rngs=rngs)

    model = M(nnx.Rngs(0))
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    p = tpflax.plan(model, mesh, rules=[("l/kernel", "column")])
    part = nnx.state(model, nnx.Param)
    with pytest.raises(tpflax.PlanMismatchError, match=r"it holds 4 of the plan's 6 leaves, each as planned: a part of "
                                                       r"the planned tree, such as nnx.state\(model, nnx.Param\)"):
        tpflax.shard(part, p, mesh)
    placed = jax.device_put(part, tpflax.state_shardings(part, p, mesh))  # what it says to do
    assert placed["l"]["kernel"].value.sharding.spec == P(None, "model")
    # a tree with a leaf the plan lacks gets no such hint
    with pytest.raises(tpflax.PlanMismatchError) as e:
        tpflax.shard({"l": {"kernel": np.ones((16, 32), np.float32)}, "x": np.ones(3, np.float32)}, p, mesh)
    assert "a part of the planned tree" not in str(e.value)


def test_gathered_loss_takes_an_abstract_mesh_as_constrain_does():
    # it constrains and places nothing, but refused an AbstractMesh: "an AbstractMesh has no devices to place
    # arrays on" (constrain and shardings take one)
    import jax.numpy as jnp

    mesh = tpflax.make_mesh({"fsdp": 2, "model": 4})
    am = jax.sharding.AbstractMesh((2, 4), ("fsdp", "model"))
    w = {"w": jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32) / 512, "b": jnp.ones((32,))}
    p = tpflax.plan(w, mesh, rules=[("w", ("fsdp", "model"))])
    loss = lambda t, x: ((x @ t["w"] + t["b"]) ** 2).mean()  # noqa: E731
    x = jnp.ones((4, 16))
    value, grad = jax.jit(jax.value_and_grad(tpflax.gathered_loss(loss, p, am)))(tpflax.shard(w, p, mesh), x)
    want_value, want_grad = jax.value_and_grad(loss)(w, x)
    assert grad["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
    # float32 sums in another order: a few ulps
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad["w"]), np.asarray(want_grad["w"]), rtol=1e-5)


def test_estimate_names_an_optimizer_without_init():
    # a misspelt name or an uncalled optax factory with a batch given failed in optax's init: "optimizer.init failed
    # on the planned parameters: AttributeError: 'str' object has no attribute 'init'"
    p = tpflax.plan({"w": jax.ShapeDtypeStruct((16, 32), "float32")}, {"data": 2, "model": 4})
    with pytest.raises(tpflax.EstimateError, match=r"^optimizer 'adamx' is no optax.GradientTransformation \(it has "
                                                   r"no init\(\)\); pass one, e.g. optax.adamw\(1e-3\), or None"):
        tpflax.estimate(p, "adamx", {"x": (8, 16)})
    with pytest.raises(tpflax.EstimateError, match=r"^optimizer optax.adam is the optimizer's factory: call it, "
                                                   r"e.g. optax.adam\(1e-3\)"):
        tpflax.estimate(p, optax.adam, {"x": (8, 16)})
    with pytest.raises(tpflax.EstimateError, match=r"^optimizer 3.5 is no optax.GradientTransformation"):
        tpflax.estimate(p, 3.5)


def test_a_nested_list_where_the_plan_has_an_array_is_named():
    # {"w": [[1.0] * 8] * 4} listed 32 problems "w/0/0: in the tree but not in the plan (shape ()); re-plan", and
    # re-planning the list plans 32 scalars
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    p = tpflax.plan({"w": jax.ShapeDtypeStruct((4, 8), "float32"), "b": jax.ShapeDtypeStruct((8,), "float32")}, mesh)
    with pytest.raises(tpflax.PlanMismatchError, match=r"\(w is a container of 32 leaves in the tree where the plan has "
                                                       r"an array of shape \(4, 8\): .*pass np.asarray"):
        tpflax.shard({"w": [[1.0] * 8] * 4, "b": np.ones(8, np.float32)}, p, mesh)


def test_shard_names_an_abstract_leaf_by_its_path():
    # the leaf was named in jax's key form, "e.g. ['down']['bias']", where every other message says "down/bias"
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    tree = {"down": {"bias": jax.ShapeDtypeStruct((8,), "float32"), "kernel": jax.ShapeDtypeStruct((8, 8), "float32")}}
    p = tpflax.plan(tree, mesh)
    with pytest.raises(tpflax.TreeError, match=r"2 leaves are abstract \(jax.ShapeDtypeStruct, e.g. down/bias\)"):
        tpflax.shard(tree, p, mesh)


def test_a_mesh_of_the_plans_axes_in_another_order_says_so():
    # "the mesh {'model': 4, 'data': 2} differs from the plan's mesh {'data': 2, 'model': 4}": two dicts a reader
    # takes for equal; the order is what differs
    p = tpflax.plan({"w": jax.ShapeDtypeStruct((16, 32), "float32")}, {"data": 2, "model": 4})
    swapped = jax.sharding.AbstractMesh((4, 2), ("model", "data"))
    with pytest.raises(tpflax.PlanMismatchError, match=r"\(the same axes in another order: model, data where the plan "
                                                       r"has data, model\)"):
        tpflax.shardings(p, swapped)
    with pytest.raises(tpflax.PlanMismatchError) as e:
        tpflax.shardings(p, jax.sharding.AbstractMesh((4, 2), ("data", "model")))
    assert "another order" not in str(e.value)


def test_make_mesh_given_a_platform_name_as_devices_says_so():
    # devices="cpu" was read letter by letter: "but 3 are not: 'c' (str)"
    with pytest.raises(tpflax.DeviceError, match=r"devices='cpu' is a str, not a list of jax devices; pass e.g. "
                                                 r"jax.devices\('cpu'\)\[:2\]"):
        tpflax.make_mesh({"data": 2}, devices="cpu")
