"""Truth tests: estimates against programs XLA really compiles on 8 CPU-emulated devices.

Every (model, mesh) is compiled once (module-scoped cache) with the standard
train step: forward, backward and an adamw update. The bounds are the issue's:
params + state + optimizer state + batch per device within 2% of XLA's argument
bytes, and collective bytes per step within 15% of the compiled HLO's.
"""

import functools
import io
import json
from contextlib import redirect_stderr, redirect_stdout

import jax
import jax.numpy as jnp
import optax
import pytest
from _util import FAST_XLA, newer_xla
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import DryRun, cli, dry_run, estimate, make_train_step, trace_activations, zoo

MESHES = ({"model": 8}, {"data": 2, "model": 4}, {"fsdp": 4, "model": 2})
MODELS = ("mlp", "cnn", "gpt2", "llama", "llama-scan", "moe", "vit", "lstm", "gru", "nnx-mlp")
# tokens per device above the hidden width: the regime where fsdp means ZeRO-3
BATCH = {"mlp": 512, "cnn": 16, "gpt2": 32, "llama": 32, "llama-scan": 32, "moe": 32, "vit": 16,
         "lstm": 32, "gru": 32, "nnx-mlp": 512}
MEM_BOUND, COMM_BOUND = 0.02, 0.15
# XLA:CPU without LLVM's optimisations: the same HLO passes, so the same memory, collectives and
# FLOPs (test_compiler_options_reach_xla_and_leave_the_numbers_alone), in ~60% of the compile time
NO_LLVM_OPT = {"xla_backend_optimization_level": 0}


@functools.cache
def _acts(name):
    m = zoo.get(name)
    return m, m.abstract_variables(), trace_activations(m, BATCH[name])


@functools.cache
def case(name, mesh_key):
    sizes = dict(mesh_key)
    m, variables, acts = _acts(name)
    opt = optax.adamw(1e-3)
    p = tpflax.plan(variables, sizes, fsdp_min_bytes=1024)
    mesh = tpflax.make_mesh(p.mesh)
    ts = make_train_step(m, p, mesh, opt, BATCH[name], variables=variables)
    # dry_run's CPU default is NO_LLVM_OPT (asserted): so test_a_cpu_dry_run_skips_llvm_... reads its default
    # compile off this case instead of compiling the same program again
    dr = dry_run(ts, p, mesh)
    assert dr.compiler_options == tuple(NO_LLVM_OPT.items()), dr.compiler_options
    est = estimate(p, opt, ts.args[2], model=m, activations=acts, backend="cpu")
    return p, est, dr


# The planner splits the tiny MoE's 4 attention heads 8 ways (head_dim split); XLA then reshards attention with
# collective-permutes and all-to-alls the estimate does not model (it says so in Estimate.notes; 262 KB of 2.86 MB).
# It was a strict xfail until the whole key/value kernels beside the split queries were priced in XLA:CPU's pieces
# (cost/whole.py output_pieces): -10.9% of the compiled collectives now, inside COMM_BOUND.
# test_moe_with_whole_heads_matches shows the same mesh with the heads kept whole.
KNOWN: dict[tuple, str] = {}
# llama-scan data=2,model=4 was known off (0.74): the remat recompute's attention-output sums, now counted;
# then 0.857: under remat XLA:CPU splits the whole GQA key/value kernels in their heads, all-reduces their input
# gradients and gathers their split updates (cost/whole.py output_pieces), now priced: 1.000.
CASES = [pytest.param(n, tuple(s.items()), id=f"{n}-{','.join(f'{k}={v}' for k, v in s.items())}",
                      marks=[pytest.mark.xfail(reason=KNOWN[(n, tuple(s.items()))], strict=True)]
                      if (n, tuple(s.items())) in KNOWN else [])
         for n in MODELS for s in MESHES]


@pytest.mark.slow
@pytest.mark.parametrize("name, mesh_key", CASES)
def test_estimate_matches_compiled_program(name, mesh_key):
    p, est, dr = case(name, mesh_key)
    cmp = dr.compare(est)
    assert dr.memory["argument"] is not None, dr.warnings
    assert abs(cmp.memory_error) <= MEM_BOUND, "\n".join(cmp.report_lines())
    assert dr.collectives or not est.items
    assert abs(cmp.comm_error) <= COMM_BOUND, "\n".join(cmp.report_lines())


@pytest.mark.slow
def test_moe_with_whole_heads_matches():
    m, variables, acts = _acts("moe")
    p = tpflax.plan(variables, {"model": 8}, fsdp_min_bytes=1024,
                    rules=[("attn/(query|key|value|out)", "replicate")])
    mesh = tpflax.make_mesh(p.mesh)
    ts = make_train_step(m, p, mesh, optax.adamw(1e-3), BATCH["moe"], variables=variables)
    cmp = dry_run(ts, p, mesh, compiler_options=NO_LLVM_OPT).compare(
        estimate(p, optax.adamw(1e-3), ts.args[2], model=m, activations=acts, backend="cpu"))
    assert abs(cmp.comm_error) <= COMM_BOUND and abs(cmp.memory_error) <= MEM_BOUND
    split = estimate(tpflax.plan(variables, {"model": 8}), None, ts.args[2], model=m, activations=acts)
    assert any("heads do not divide" in n for n in split.notes)


def test_a_cpu_dry_run_skips_llvm_and_reads_the_same_numbers_as_xlas_default_compile():
    # dry_run's CPU default (DEFAULT_COMPILER_OPTIONS) only skips LLVM's optimisations of code it never runs:
    # the scanned, remat llama's step (a while loop, collectives on both axes) compiles to the same memory,
    # collectives and FLOPs as at XLA's default level (3; set explicitly: the root conftest sets 0 in XLA_FLAGS
    # for every compile of the tests), to the byte
    p, _, fast = case("llama-scan", (("data", 2), ("model", 4)))  # dry_run(ts, p, mesh): its default options
    m, variables, _ = _acts("llama-scan")
    mesh = tpflax.make_mesh(p.mesh)
    ts = make_train_step(m, p, mesh, optax.adamw(1e-3), BATCH["llama-scan"], variables=variables)
    xla_default = {"xla_backend_optimization_level": 3}
    full = dry_run(ts, p, mesh, compiler_options=xla_default)
    assert fast.collectives and fast.flops
    assert (fast.memory, fast.collectives, fast.flops) == (full.memory, full.collectives, full.flops)
    assert fast.compiler_options == (("xla_backend_optimization_level", 0),)
    assert full.compiler_options == tuple(xla_default.items())
    assert "without LLVM's optimisations" in fast.report_lines()[0]
    assert "LLVM" not in full.report_lines()[0] and fast.to_dict()["compiler_options"] == dict(fast.compiler_options)


def test_fsdp_step_gathers_parameters_and_reduces_gradients():
    p, est, dr = case("llama", (("fsdp", 4), ("model", 2)))
    kinds = {(c.kind, c.axis_label) for c in dr.collectives}
    assert ("all-gather", "fsdp") in kinds and ("all-reduce", "fsdp") in kinds
    # the estimate names the same collectives on the same axis, to the byte here
    assert est.comm["all-gather"]["fsdp"] == pytest.approx(dr.comm()["all-gather"]["fsdp"], rel=0.01)


def test_report_shows_estimated_and_compiled_memory_side_by_side():
    p, est, dr = case("gpt2", (("data", 2), ("model", 4)))
    text = tpflax.report(p, est, dry_run=dr)
    assert "estimated vs compiled" in text and "arguments (params+state+opt+batch)" in text
    assert "dry run on cpu" in text
    data = json.loads(tpflax.report(p, est, fmt="json", dry_run=dr))
    rows = {r["name"]: r for r in data["estimate_vs_compiled"]["rows"]}
    assert rows["arguments (params+state+opt+batch)"]["compiled"] == dr.memory["argument"]
    peak = rows["peak (what must fit per device)"]
    assert peak["estimated"] == est.peak and peak["compiled"] == dr.memory["peak"]
    assert dr.compare(est).peak_error == pytest.approx((est.peak - dr.memory["peak"]) / dr.memory["peak"])
    assert dr.flops and dr.flops > 0


def test_compiler_options_reach_xla_and_leave_the_numbers_alone():
    # without LLVM's optimisations (dry_run's CPU default, which case() uses) XLA:CPU runs the same HLO passes
    # as with them (XLA's own default, level 3): the same buffers, collectives and FLOPs, to the byte
    p, _, fast = case("mlp", (("model", 8),))
    m, variables, _ = _acts("mlp")
    mesh = tpflax.make_mesh(p.mesh)
    ts = make_train_step(m, p, mesh, optax.adamw(1e-3), BATCH["mlp"], variables=variables)
    dr = dry_run(ts, p, mesh, compiler_options={"xla_backend_optimization_level": 3})  # XLA's defaults
    assert dr.compiler_options != fast.compiler_options
    assert (fast.memory, fast.collectives, fast.flops) == (dr.memory, dr.collectives, dr.flops)
    with pytest.raises(tpflax.CompileError):  # the options are really handed to XLA
        dry_run(ts, p, mesh, compiler_options={"xla_no_such_option": 1})


def test_unreported_memory_is_not_compared_against_zero():
    p, est, dr = case("mlp", (("model", 8),))
    blind = DryRun(memory={"argument": None, "output": None, "temp": None, "alias": None,
                           "generated_code": None}, collectives=dr.collectives, flops=None,
                   compile_seconds=0.0, mesh=p.mesh, warnings=("XLA reported zero or -1",))
    cmp = blind.compare(est)
    assert cmp.memory_error is None
    assert "not reported" in "\n".join(cmp.report_lines())


def test_user_step_with_plain_args_and_optimizer():
    m = zoo.get("mlp")
    variables = m.abstract_variables()
    p = tpflax.plan(variables, {"data": 2, "model": 4})
    mesh = tpflax.make_mesh(p.mesh)
    opt = optax.sgd(0.1, momentum=0.9)

    def step(v, s, batch):
        loss, g = jax.value_and_grad(lambda prm: m.loss({"params": prm}, batch))(v["params"])
        u, s = opt.update(g, s, v["params"])
        return {"params": optax.apply_updates(v["params"], u)}, s, loss

    batch = jax.eval_shape(lambda: m.make_batch(0, 16))
    dr = dry_run(step, p, mesh, (variables, jax.eval_shape(opt.init, variables["params"]), batch),
                 optimizer=opt, donate_argnums=(0, 1))
    est = estimate(p, opt, batch, model=m, backend="cpu")
    assert abs(dr.compare(est).memory_error) <= MEM_BOUND


def test_user_step_over_a_boxed_tree_places_its_bare_optimizer_state_by_the_plan():
    # variables boxed by nn.with_logical_partitioning, the optimizer state of their arrays (as
    # shard_optimizer_state(tx, None, plan, mesh) makes it): dry_run took the state for a batch (dim 0 over
    # fsdp), 38,212 argument bytes per device instead of the 13,380 the same step holds on the unboxed tree
    import flax.linen as nn

    def lp(*names):
        return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(32, kernel_init=lp("mlp", "embed"), name="down")(
                nn.gelu(nn.Dense(128, kernel_init=lp("embed", "mlp"), name="up")(x)))

    m, x = Net(), jax.ShapeDtypeStruct((8, 32), jnp.float32)
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    bare = nn.meta.unbox(v)
    p = tpflax.plan(v, {"fsdp": 2, "model": 4}, fsdp_min_bytes=0)
    mesh = tpflax.make_mesh(p.mesh)
    opt = optax.adam(1e-3)

    def step(v, s, x):
        prm = nn.meta.unbox(v["params"])
        loss, g = jax.value_and_grad(lambda q: jnp.mean(m.apply({"params": q}, x) ** 2))(prm)
        u, s = opt.update(g, s, prm)
        return optax.apply_updates(prm, u), s, loss

    state = jax.eval_shape(opt.init, bare["params"])
    held = [dry_run(step, p, mesh, (tree, state, x), optimizer=opt, compiler_options=FAST_XLA).memory["argument"]
            for tree in (v, bare)]
    assert held[0] == held[1], held


def test_optimizer_state_of_the_whole_variables_is_placed_by_the_plan():
    # tx.init(variables) on a params-only linen tree (a state keyed by "params" too): dry_run took it for a
    # batch and split every moment's dim 0 over the data axis, so the step it compiled was not the plan's
    m = zoo.get("mlp")
    variables = m.abstract_variables()
    p = tpflax.plan(variables, {"data": 2, "model": 4})
    mesh = tpflax.make_mesh(p.mesh)
    opt = optax.adam(1e-3)

    def step(v, s, batch):
        g = jax.grad(m.loss)(v, batch)
        u, s = opt.update(g, s, v)
        return optax.apply_updates(v, u), s

    batch = jax.eval_shape(lambda: m.make_batch(0, 16))
    state = jax.eval_shape(opt.init, variables)
    # the same state placed by hand: each moment as its parameter, the step count whole
    placed = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                    variables, tpflax.shardings(p, mesh))
    count = jax.ShapeDtypeStruct((), state[0].count.dtype, sharding=NamedSharding(mesh, P()))
    by_hand = (optax.ScaleByAdamState(count=count, mu=placed, nu=placed), *state[1:])
    held = [dry_run(step, p, mesh, (variables, s, batch), optimizer=opt, compiler_options=FAST_XLA).memory["argument"]
            for s in (state, by_hand)]
    assert held[0] == held[1], held


def test_batch_that_does_not_divide_fails_before_compiling():
    m = zoo.get("mlp")
    p = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4})
    with pytest.raises(tpflax.SpecError, match=r"is 7, not divisible by mesh axes data=2"):
        make_train_step(m, p, tpflax.make_mesh(p.mesh), optax.sgd(0.1), 7)


def test_compile_failure_is_one_error_naming_the_leaf():
    m = zoo.get("mlp")
    variables = m.abstract_variables()
    p = tpflax.plan(variables, {"model": 8})
    mesh = tpflax.make_mesh(p.mesh)
    assert variables["params"]["head"]["kernel"].shape == (64, 10)
    # a bad user sharding: 10 output classes do not split over model=8
    in_sh = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), variables)
    in_sh["params"]["head"]["kernel"] = NamedSharding(mesh, P(None, "model"))

    def f(v):
        return jnp.sum(v["params"]["head"]["kernel"])

    with pytest.raises(tpflax.CompileError) as info:
        dry_run(f, p, mesh, (variables,), in_shardings=(in_sh,))
    msg = str(info.value)
    assert "head/kernel" in msg and "(64, 10)" in msg and "model=8" in msg and "XLA/jax said" in msg


def test_cli_dry_run_and_estimate():
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(["dry-run", "mlp", "--mesh", "data=2,model=4", "--batch", "16", "--devices", "8"])
    assert rc == 0, err.getvalue()
    text = out.getvalue()
    assert "estimated vs compiled" in text and "total collective bytes per step" in text
    assert "compiled" not in err.getvalue()  # stderr is piped here: progress stays quiet
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(["estimate", "llama", "--mesh", "fsdp=4,model=2", "--batch", "32", "--json"])
    assert rc == 0
    data = json.loads(out.getvalue())
    assert data["estimate"]["per_device"]["opt_state"] > 0
    err = io.StringIO()
    with redirect_stderr(err):
        rc = cli.main(["estimate", "gpt2", "--mesh", "data=2,model=4", "--batch", "32x7"])
    assert rc == 2 and "seq_len 32" in err.getvalue()


# a newer XLA:CPU holds fewer float32 buffers in the bfloat16 step than the CPU rules (read off 0.10's) count
BF16_PEAK = newer_xla("the bfloat16 step's compiled peak 6,651,664 bytes (temp 6,375,168) against 0.10's 7,458,260 "
                      "(temp 7,181,764): the estimate +15.7%, not +3%; the float32 step's is the same on both")


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=BF16_PEAK)])
def test_cpu_peak_counts_what_xla_cpu_holds(dtype):
    # backend="cpu": XLA:CPU computes 16-bit activations in float32, and each LayerNorm keeps its scale and
    # statistics broadcast to its input's shape (tpflax/_src/cost/peak.py held_item, norm_broadcasts).
    # Measured on this step (mlp, 2048 examples, model=8, adamw): estimate +7% (f32) and +3% (bf16) against
    # the compiled peak; before the rules -22% and -60% (the bf16 step held float32 buffers the estimate
    # counted in bfloat16). 15%: the rules' error here, with room for XLA's scheduling, and well short of
    # the -22% the float32 step was off by without them.
    m = zoo.get("mlp", dtype=dtype)
    variables = m.abstract_variables()
    p = tpflax.plan(variables, {"model": 8}, fsdp_min_bytes=1024)
    mesh = tpflax.make_mesh(p.mesh)
    ts = make_train_step(m, p, mesh, optax.adamw(1e-3), 2048, variables=variables)
    dr = dry_run(ts, p, mesh)
    cmp = dr.compare(estimate(p, optax.adamw(1e-3), ts.args[2], model=m, backend="cpu"))
    assert abs(cmp.peak_error) <= 0.15, "\n".join(cmp.report_lines())
