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
    assert d["down/kernel"]["spec"] == ["model", None]


def test_console_script_help_and_devices():
    r = subprocess.run([sys.executable, "-m", "tpflax.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "examples:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tpflax.cli", "plan", "mlp", "--mesh", "data=2,model=4",
                        "--devices", "8", "--no-reasons"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "bound to" in r.stdout and "8 cpu devices" in r.stdout
