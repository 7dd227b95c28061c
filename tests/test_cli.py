"""The `tpflax plan` command: output streams and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tpflax.cli import main


def test_plan_json_goes_to_stdout_only(capsys):
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["format"] == "tpflax.plan"
    d = {x["path"]: x for x in data["decisions"]}
    assert d["params/h_0/mlp/c_fc/kernel"]["spec"] == [None, "model"]
    assert err == ""


def test_plan_text_with_pairs(capsys):
    assert main(["plan", "llama", "--mesh", "model=2", "--pairs"]) == 0
    out = capsys.readouterr().out
    assert "pairs:" in out and "down_proj" in out and "savings per device" in out


@pytest.mark.parametrize("argv,words", [
    (["plan", "gpt2", "--mesh", "data=2,model"], "is not name=size"),
    (["plan", "gpt2", "--mesh", "model=0"], "sizes must be integers"),
    (["plan", "no-such-model", "--mesh", "model=2"], "unknown model"),
    (["plan", "no_such_pkg.mod:make", "--mesh", "model=2"], "cannot import"),
    (["plan", "gpt2", "--mesh", "model=2", "--rule", "c_fc=colum"], "names mesh axis 'colum'"),
    (["plan", "gpt2", "--mesh", "model=2", "--rule", "nonsense"], "REGEX=TARGET"),
    (["plan", "gpt2", "--mesh", "model=3", "--rule", "c_fc/kernel=None,model"], "not divisible"),
    (["estimate", "mlp", "--mesh", "data=2,model=4", "--batch", "8x999"], "inputs are 8x32"),  # was ignored
    # an empty side (an unset shell variable) replicated every leaf, or the matched ones, without a word
    (["plan", "mlp", "--mesh", "model=2", "--rule", "=replicate"], "has an empty REGEX, which matches every leaf"),
    (["plan", "mlp", "--mesh", "model=2", "--rule", "up/kernel="], "has an empty TARGET"),
    # a Python spec was split at its commas: "names mesh axis '(None'"
    (["plan", "mlp", "--mesh", "model=2", "--rule", "up/kernel=(None,model)"], "is not a TARGET; write TARGET"),
])
def test_bad_input_exits_2_with_message_on_stderr(capsys, argv, words):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "tpflax: error:" in err and words in err


def test_strict_exits_1_on_warnings(capsys):
    argv = ["plan", "gpt2", "--mesh", "model=2", "--rule", "matches_nothing=replicate"]
    assert main(argv) == 0
    assert main(argv + ["--strict"]) == 1
    assert "matches no leaf" in capsys.readouterr().out


def test_rule_parsing_and_factory_models(tmp_path, monkeypatch, capsys):
    (tmp_path / "userpkg_models.py").write_text(
        "import jax\n"
        "def make():\n"
        "    S = jax.ShapeDtypeStruct\n"
        "    return {'up': {'kernel': S((64, 256), 'float32')}, 'down': {'kernel': S((256, 64), 'float32')}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plan", "userpkg_models:make", "--mesh", "fsdp=2,model=4", "--json",
                 "--rule", "up/kernel=fsdp,model"]) == 0
    d = {x["path"]: x for x in json.loads(capsys.readouterr().out)["decisions"]}
    assert d["up/kernel"]["spec"] == ["fsdp", "model"]
    assert d["down/kernel"]["spec"] == ["model", "fsdp"]  # fsdp decided by cost (no size threshold)


def test_console_script_help_and_devices(capsys):
    # the top-level help in this process (its text is the parser's, wherever it runs); the module run as a
    # script, with --devices set up in its own fresh process, in a real one (each costs ~6 s of imports)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "examples:" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "tpflax.cli", "plan", "mlp", "--mesh", "data=2,model=4",
                        "--devices", "8", "--no-reasons"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tpflax plan") and "bound to" in r.stdout and "8 cpu devices" in r.stdout



def test_plan_help_shows_the_plan_examples_only(capsys):
    # `tpflax plan --help` repeated the top-level examples, estimate, dry-run and suggest among them
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    examples = capsys.readouterr().out.split("examples:\n", 1)[1].splitlines()
    assert examples and all(line.lstrip().startswith("tpflax plan ") for line in examples)
    assert any("--html" in line for line in examples)


def test_python_m_tpflax_runs_the_cli():
    # `python -m tpflax` said "No module named tpflax.__main__; 'tpflax' is a package and cannot be directly
    # executed": the way to run the CLI where the environment's scripts are not on PATH
    import tpflax

    # (`plan mlp ... --devices 8` itself runs in a fresh process in test_console_script_help_and_devices: here
    # `python -m tpflax` hands its arguments to that CLI and returns its exit code, an error's as well)
    r = subprocess.run([sys.executable, "-m", "tpflax", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"tpflax {tpflax.__version__}", r.stderr
    r = subprocess.run([sys.executable, "-m", "tpflax", "plan", "mlp", "--mesh", "data=2,modl"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("tpflax: error: cannot parse mesh 'data=2,modl'"), r.stderr


def test_a_closed_pipe_stops_quietly():
    # `tpflax plan ... | head`: the reader gone, the CLI said "tpflax: error: a file: Broken pipe" and exited 2,
    # the exit code of bad input; now nothing on stderr and 141, a tool stopped by SIGPIPE's
    # (`plan mlp`: the CLI's own first write fails alike, ~5 s sooner than `zoo`, which sizes every zoo model first)
    p = subprocess.Popen([sys.executable, "-m", "tpflax.cli", "plan", "mlp", "--mesh", "data=2,model=4", "--no-reasons"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before the CLI has printed anything: its first write fails
    err = p.stderr.read()
    assert p.wait(timeout=300) == 141 and err == "", err

USERPKG = '''
import flax.linen as nn
import jax
import jax.numpy as jnp

S = jax.ShapeDtypeStruct


class Block(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(64, 32, name="tok")(ids)
        h = h + nn.Dense(32, name="b")(nn.relu(nn.Dense(128, name="a")(h)))
        return nn.Dense(64, name="out")(h)


def make_linen():
    return Block(), S((8, 16), jnp.int32)


def apply_fn(variables, ids):
    h = variables["wte"][ids]
    return (h + jnp.tanh(h @ variables["w_in"]) @ variables["w_out"]) @ variables["wte"].T


def make_fn():
    variables = {"wte": S((64, 32), jnp.float32), "w_in": S((32, 128), jnp.float32),
                 "w_out": S((128, 32), jnp.float32)}
    return apply_fn, variables, S((8, 16), jnp.int32)


def make_half():
    return (apply_fn,)


def make_packed():
    return Block(), (S((8, 16), jnp.int32),)


class DictIn(nn.Module):
    @nn.compact
    def __call__(self, batch):
        return nn.Dense(16, name="b")(nn.relu(nn.Dense(64, name="a")(batch["x"])))


def make_dict_input():
    return DictIn(), {"x": S((8, 16), jnp.float32)}


class Scaled(nn.Module):
    @nn.compact
    def __call__(self, t, x):
        return nn.Dense(16, name="b")(nn.relu(nn.Dense(64, name="a")(x))) * t


def make_scalar_first():
    return Scaled(), S((), jnp.float32), S((8, 16), jnp.float32)


def make_nnx_alone():
    from flax import nnx

    return nnx.Linear(16, 64, rngs=nnx.Rngs(0))
'''


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    (tmp_path / "userpkg_any.py").write_text(USERPKG)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userpkg_any"


@pytest.mark.parametrize("factory", ["make_linen", "make_fn"])
def test_trace_accepts_a_user_model(userpkg, factory, capsys):
    assert main(["plan", f"{userpkg}:{factory}", "--mesh", "model=4", "--trace", "--json"]) == 0
    d = {x["path"]: x for x in json.loads(capsys.readouterr().out)["decisions"]}
    up, down = ("params/a/kernel", "params/b/kernel") if factory == "make_linen" else ("w_in", "w_out")
    assert d[up]["spec"] == [None, "model"] and d[down]["spec"] == ["model", None]
    assert d[up]["source"] == "trace"


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["make_linen", "make_fn"])
def test_dry_run_accepts_a_user_model(userpkg, factory, capsys):
    assert main(["dry-run", f"{userpkg}:{factory}", "--mesh", "data=2,model=4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dry_run"]["memory"]["argument"] > 0
    assert main(["dry-run", f"{userpkg}:{factory}", "--mesh", "data=2,model=4", "--batch", "4x9"]) == 2
    assert "inputs are 4x16 for a batch of 4; pass --batch 4x16 or just --batch 4" in capsys.readouterr().err


def test_estimate_of_a_user_model_reads_its_activations(userpkg, capsys):
    # the CLI hands a factory's linen model and sample to estimate(), as the Python API does: its
    # activations come from the model's layers, not from nothing (they were 0 B)
    assert main(["estimate", f"{userpkg}:make_linen", "--mesh", "data=2,model=4", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)["estimate"]
    assert est["per_device"]["activations"] > 0, est["per_device"]
    # without --batch, the factory's own sample (8 examples) is the batch, as for plan and dry-run (it was 32)
    assert est["batch"]["size"] == 8, est["batch"]


def test_a_user_models_batch_is_its_first_input_with_a_batch_dim(userpkg, capsys):
    """A factory whose sample is a dict, or starts with a scalar: without --batch the batch is the leading dim of
    the first input that has one (a traceback, 'dict' object has no attribute 'shape', and a batch of 1 before);
    dry-run without --loss says the loss cannot be inferred from a dict input (a bare AttributeError before)."""
    for factory in ("make_dict_input", "make_scalar_first"):
        assert main(["estimate", f"{userpkg}:{factory}", "--mesh", "data=2,model=4", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["estimate"]["batch"]["size"] == 8
    assert main(["dry-run", f"{userpkg}:make_dict_input", "--mesh", "data=2,model=4"]) == 2
    err = capsys.readouterr().err
    assert "cannot infer a loss for DictIn" in err and "first input a dict" in err and "--loss" in err


def test_an_nnx_module_without_a_sample_is_planned_but_not_traced(userpkg, capsys):
    """Its variables plan; tracing or running it needs its inputs, which the factory must return (the error
    was the Python API's "pass sample=(x,)", a flag the command line does not have)."""
    assert main(["plan", f"{userpkg}:make_nnx_alone", "--mesh", "model=4"]) == 0
    capsys.readouterr()
    for argv in (["plan", "--trace"], ["dry-run"]):
        assert main([argv[0], f"{userpkg}:make_nnx_alone", "--mesh", "model=4", *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert "returned an nnx Module without sample inputs" in err and "(module, jax.ShapeDtypeStruct" in err


def test_user_model_mistakes_are_named(userpkg, capsys):
    assert main(["plan", f"{userpkg}:make_half", "--mesh", "model=4"]) == 2
    assert "return (fn, variables, *sample)" in capsys.readouterr().err
    assert main(["plan", f"{userpkg}:make_packed", "--mesh", "model=4"]) == 2
    assert "return the sample inputs unpacked" in capsys.readouterr().err


def test_version(capsys):
    import tpflax

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tpflax {tpflax.__version__}"
    # run as a script: test_console_script_help_and_devices (tpflax.cli) and test_python_m_tpflax_runs_the_cli


def test_an_unwritable_output_path_is_a_usage_error(tmp_path, capsys):
    # exit 2 with one line naming the path (exit 1 means warnings under --strict), no traceback
    assert main(["plan", "mlp", "--mesh", "model=2", "--why", str(tmp_path / "missing" / "why.txt")]) == 2
    err = capsys.readouterr().err
    assert "missing/why.txt' cannot be written" in err and "No such file or directory" in err


@pytest.mark.parametrize("argv", [
    ["plan", "gpt2", "--mesh", "data=2,model=4", "--devices", "-1"],
    ["plan", "gpt2", "--mesh", "data=2,model=4", "--devices", "0"],
    ["suggest", "mlp", "--world-size", "8", "--top", "-1"],
    ["suggest", "mlp", "--world-size", "0"],
])
def test_non_positive_counts_exit_2_before_jax_starts(capsys, argv):
    # --devices -1 reached XLA (an 80-line 'vector::reserve' traceback) and 0 was ignored
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "is below 1" in capsys.readouterr().err


@pytest.fixture
def fast_xla():
    """XLA:CPU without LLVM's optimisations while a CLI dry run compiles (the same HLO passes, so the same
    memory, collectives and FLOPs: FAST_XLA in _util.py, as test_readme.py does); then every kept executable
    is dropped, so no later test is served one compiled so."""
    import jax

    was = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", was)
        jax.clear_caches()


def test_dry_run_json_is_strict_json_and_honours_strict(capsys, fast_xla):
    # an estimated collective XLA did not emit gave rel_error Infinity (not JSON); --strict --json exited 0
    argv = ["dry-run", "llama", "--mesh", "fsdp=4,model=2", "--backend", "gpu", "--json"]
    assert main(argv) == 0

    def refuse(c):
        raise ValueError(f"not JSON: {c}")

    data = json.loads(capsys.readouterr().out, parse_constant=refuse)
    rows = [r for r in data["estimate_vs_compiled"]["rows"] if r.get("estimate_only")]
    assert rows and all(r["rel_error"] is None and r["compiled"] == 0 for r in rows)
    # a plan with a warning (a model axis of 3 splits no leaf: the same warning as gpt2's, on the zoo's mlp, whose
    # two compiles cost about half of gpt2's) exits 0, and 1 under --strict
    assert main(["dry-run", "mlp", "--mesh", "model=3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out, parse_constant=refuse)["warnings"]
    assert main(["dry-run", "mlp", "--mesh", "model=3", "--json", "--strict"]) == 1


def test_dry_run_skips_llvm_on_cpu_unless_asked_for_xlas_defaults(capsys):
    # the same numbers either way (tests/test_dryrun.py); the JSON says which compile it was
    runs = []
    for extra in ([], ["--xla-defaults"]):
        assert main(["dry-run", "mlp", "--mesh", "data=2,model=2", "--json", *extra]) == 0
        runs.append(json.loads(capsys.readouterr().out)["dry_run"])
    assert [r["compiler_options"] for r in runs] == [{"xla_backend_optimization_level": 0}, {}]
    assert runs[0]["memory"] == runs[1]["memory"] and runs[0]["collectives"] == runs[1]["collectives"]


CNNPKG = '''
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

S = jax.ShapeDtypeStruct


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, y):
        h = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        return nn.Dense(10, name="head")(h.mean(axis=(1, 2)))


def make():
    return CNN(), S((8, 8, 8, 3), jnp.float32), S((8,), jnp.int32)


def xent(logits, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
'''


@pytest.fixture
def cnnpkg(tmp_path, monkeypatch):
    (tmp_path / "userpkg_cnn.py").write_text(CNNPKG)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userpkg_cnn"


def test_dry_run_takes_a_loss_for_a_user_cnn(cnnpkg, capsys, fast_xla):
    # a classifier has no default loss: the error told the CLI user to pass loss=, which the CLI could not
    argv = ["dry-run", f"{cnnpkg}:make", "--mesh", "data=2,model=4", "--json"]
    assert main(argv) == 2
    assert "--loss package.module:function" in capsys.readouterr().err
    assert main(argv + ["--loss", f"{cnnpkg}:xent"]) == 0
    assert json.loads(capsys.readouterr().out)["dry_run"]["memory"]["argument"] > 0


@pytest.mark.parametrize("target,words", [
    ("{pkg}:no_such_fn", "has no callable 'no_such_fn' (from --loss"),
    ("no_such_mod_xyz:xent", "cannot import 'no_such_mod_xyz' from --loss"),
    ("xent", "must be package.module:name"),
])
def test_a_bad_loss_target_exits_2(cnnpkg, capsys, target, words):
    argv = ["dry-run", f"{cnnpkg}:make", "--mesh", "data=2,model=4", "--loss", target.format(pkg=cnnpkg)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "tpflax: error:" in err and words in err


def test_byte_sizes_are_read_alike_wherever_the_cli_takes_one(capsys):
    # --fsdp-min-bytes was argparse's int ("invalid int value: '1GiB'") while --device-memory took 95GiB
    for text, n in (("1GiB", 1 << 30), ("512KiB", 512 << 10), ("1e6", 10**6), ("256k", 256000), ("4.1KB", 4100),
                    ("0", 0), ("1 GiB", 1 << 30)):
        assert main(["plan", "mlp", "--mesh", "fsdp=8", "--fsdp-min-bytes", text, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["options"]["fsdp_min_bytes"] == n, text
    assert main(["suggest", "mlp", "--world-size", "8", "--device-memory", "512MiB", "--fsdp-min-bytes", "1e6",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["device_memory"] == 512 << 20
    for argv in (["plan", "mlp", "--mesh", "fsdp=8", "--fsdp-min-bytes", "1GiBx"],
                 ["estimate", "mlp", "--mesh", "fsdp=8", "--fsdp-min-bytes", "nan"],
                 ["suggest", "mlp", "--world-size", "8", "--fsdp-min-bytes", "-1.5"],
                 ["suggest", "mlp", "--world-size", "8", "--device-memory", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{argv[-2]}: {argv[-1]!r} is not a size" in err, err
        assert "e.g. 1GiB, 512KiB, 256k, 1e6 or a number of bytes" in err


def test_suggest_without_memory_names_the_flags(capsys):
    # "no device memory: pass device_memory (e.g. '95GiB') or a hardware preset": the library's keyword, no flag
    assert main(["suggest", "mlp", "--world-size", "8"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "pass --device-memory (e.g. 16GiB) or --hardware (tpu-v4, tpu-v5e" in err
    assert main(["suggest", "mlp", "--world-size", "8", "--hardware", "tpu-v5e"]) == 0


def test_html_dash_is_stdout_not_a_file_named_dash(tmp_path, monkeypatch, capsys):
    # `--html -` (and `--why -`) wrote a file named "-" in the working directory beside the text report
    monkeypatch.chdir(tmp_path)
    for cmd in ("plan", "estimate"):
        assert main([cmd, "mlp", "--mesh", "model=4", "--html", "-"]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("<!DOCTYPE html>") and out.rstrip().endswith("</html>") and "wrote" not in err
    assert main(["plan", "mlp", "--mesh", "model=4", "--html", "-", "--json"]) == 2
    assert "--html - and --json both write to stdout" in capsys.readouterr().err
    assert main(["plan", "mlp", "--mesh", "model=4", "--why", "-"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--why -: stdout carries the report; give --why a file path" in err
    assert not (tmp_path / "-").exists()


def test_a_user_models_batch_takes_its_inputs_shape_as_a_zoo_models_does(userpkg, capsys):
    # --batch 8x16 for a model whose input is (8, 16) was "give only the batch size N", where a zoo model takes its
    # own NxT; a shape that is not the input's says which it is
    assert main(["estimate", f"{userpkg}:make_linen", "--mesh", "data=2,model=4", "--batch", "16x16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["batch"]["size"] == 16
    assert main(["estimate", f"{userpkg}:make_linen", "--mesh", "data=2,model=4", "--batch", "16x32"]) == 2
    assert (f"--batch '16x32': {userpkg}:make_linen's inputs are 16x16 for a batch of 16; pass --batch 16x16 or "
            "just --batch 16") in capsys.readouterr().err


def test_plan_takes_the_batch_and_hardware_its_layouts_are_priced_for(capsys):
    # `tpflax plan` had neither: every plan was priced for 8,192 tokens on tpu-v5e, and its title's hint "pass
    # batch=" named an argument the command line has no way to give
    import jax

    import tpflax
    from tpflax._src.loading import load_model

    assert main(["plan", "gpt2", "--mesh", "data=2,model=4"]) == 0
    assert "priced for 8,192 tokens/step (the default: pass batch=, or --batch)" in capsys.readouterr().out
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--batch", "2", "--hardware", "h100"]) == 0
    out = capsys.readouterr().out
    assert "priced for" not in out.splitlines()[1] and "step time on h100, 64 tokens per step" in out
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--batch", "2", "--hardware", "h100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["options"]["tokens"], data["options"]["tokens_from"], data["options"]["hardware"]) == (64, "batch",
                                                                                                      "h100")
    loaded = load_model("gpt2")  # as the library plans it for that batch
    p = tpflax.plan(loaded.variables, "data=2,model=4", hardware="h100",
                    batch=jax.eval_shape(lambda: loaded.model.make_batch(0, 2)))
    assert data["decisions"] == json.loads(p.to_json())["decisions"]
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--batch", "2x64"]) == 2
    assert "gpt2 has seq_len 32; pass --batch 2x32 or just --batch 2" in capsys.readouterr().err
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--hardware", "tpu-v9"]) == 2  # named the Python call
    assert capsys.readouterr().err.startswith("tpflax: error: --hardware tpu-v9: unknown hardware 'tpu-v9'; known presets: ")
    # `estimate` and `dry-run --batch N` estimated the step at N but planned it for 8,192 tokens
    assert main(["estimate", "gpt2", "--mesh", "data=2,model=4", "--batch", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["options"]["tokens"], data["options"]["tokens_from"]) == (64, "batch")
    # and without --batch they estimated at their default batch (32) while the plan was priced for 8,192 tokens
    assert main(["estimate", "gpt2", "--mesh", "data=2,model=4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["options"]["tokens"], data["options"]["tokens_from"]) == (32 * 32, "batch")
    assert data["estimate"]["batch"]["size"] == 32


def test_plan_html_with_a_batch_the_step_cannot_take_writes_a_parameters_only_page(tmp_path, capsys):
    # `tpflax plan --batch 3 --html` on data=2: the plan is priced for 3 sequences, but the page's adamw step
    # cannot split 3 over data=2; the page's estimate raised outside the guard that leaves a parameters-only page
    path = tmp_path / "g.html"
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--batch", "3", "--html", str(path)]) == 0
    err = capsys.readouterr().err
    assert "the HTML report shows parameters only" in err and "does not divide" in err, err
    assert path.read_text().startswith("<!DOCTYPE html>")
