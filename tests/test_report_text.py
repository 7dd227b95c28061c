"""The text report: repeated layers grouped into one row, lines that fit the terminal, --full for every leaf."""

from __future__ import annotations

import io
import json
import os
import re
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo
from tpflax.cli import main


@pytest.fixture(scope="module")
def gpt2_small():
    return tpflax.plan(zoo.get("gpt2-small").abstract_variables(), "data=2,model=4")


def test_gpt2_small_groups_its_layers_and_fits_100_columns(gpt2_small):
    text = tpflax.report(gpt2_small, width=100)
    lines = text.splitlines()
    assert max(len(x) for x in lines) <= 100
    # 12 layers x 16 leaves become 16 rows (the old report had one row per leaf: 196 rows, 205 lines);
    # the rows' wrapped reasons (each cost-chosen group names its runner-up) keep it under 100 lines
    assert len(lines) < 100
    assert "h_{0..11}/mlp/c_fc/kernel ×12" in text and "h_{0..11}/ln_{1,2}/scale ×24" in text
    assert "h_3/" not in text  # no per-layer rows
    assert "rows: 18" in text and "leaves: 196" in text
    # a group's reason names the group, not its first layer
    assert "feeds h_{0..11}/mlp/c_proj/kernel" in text


@pytest.mark.parametrize("width", [80, 100, 160])
def test_every_line_fits_the_width_asked(gpt2_small, width):
    p = tpflax.plan(zoo.get("llama").abstract_variables(), "fsdp=2,model=4", rules=[("zzz", "replicate")])
    for plan in (gpt2_small, p):
        lines = tpflax.report(plan, width=width, pairs=True).splitlines()
        assert max(len(x) for x in lines) <= width, [x for x in lines if len(x) > width]


def test_full_lists_every_leaf_unclipped(gpt2_small):
    text = tpflax.report(gpt2_small, full=True)
    for path, d in gpt2_small.decisions.items():
        assert path in text and d.reason in text
    assert "×" not in text and "rows:" not in text


def test_leaves_that_differ_within_a_group_get_their_own_rows():
    S = jax.ShapeDtypeStruct
    tree = {f"layers_{i}": {"up": {"kernel": S((64, 256), "float32")}} for i in range(4)}
    p = tpflax.plan(tree, {"model": 4}, rules=[("layers_2/", "replicate"), ("up", "column")])
    text = tpflax.report(p, width=100)
    assert "layers_{0,1,3}/up/kernel ×3" in text and "layers_2/up/kernel " in text


def test_cli_plan_is_compact_by_default_and_full_on_request(capsys):
    assert main(["plan", "gpt2-small", "--mesh", "data=2,model=4"]) == 0
    compact = capsys.readouterr().out.splitlines()
    assert main(["plan", "gpt2-small", "--mesh", "data=2,model=4", "--full"]) == 0
    full = capsys.readouterr().out.splitlines()
    assert max(map(len, compact)) <= 100 and len(compact) < 100  # piped: the 100-column default
    assert len(full) > 196 and any("params/h_7/mlp/c_fc/kernel" in x for x in full)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_on_a_terminal_only(monkeypatch):
    from tpflax._src import progress

    for stream, quiet, shown in ((_Terminal(), False, True), (_Terminal(), True, False), (io.StringIO(), False, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        progress.set_quiet(quiet)
        try:
            bar = progress.Progress("dry run on mesh model=2")
            bar.step("compiling with XLA")
            bar.done("compiled")
        finally:
            progress.set_quiet(False)
        assert ("dry run on mesh model=2: compiled" in stream.getvalue()) == shown, stream.getvalue()


def test_zoo_lists_parameters_and_real_size_bytes(capsys):
    assert main(["zoo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {x.split()[0]: x for x in lines[1:-1]}
    assert set(row) == set(zoo.names())
    assert "124,439,808" in row["gpt2-small"] and "474.7 MiB" in row["gpt2-small"]
    # 405B is extrapolated from 1 and 2 layers; the count is exact (the published 405,853,388,800)
    assert "405,853,388,800" in row["llama-405b"]
    assert max(map(len, lines)) <= 100


def test_suggest_takes_world_size_and_the_old_devices_with_a_note(capsys):
    argv = ["suggest", "mlp", "--device-memory", "1GiB", "--json"]
    assert main([*argv, "--world-size", "8"]) == 0
    new = capsys.readouterr()
    assert main([*argv, "--devices", "8"]) == 0
    old = capsys.readouterr()
    def ranked(out):
        return [r["mesh"] for r in json.loads(out)["ranked"]]

    assert ranked(old.out) == ranked(new.out) and new.err == ""
    assert "--devices is deprecated: use --world-size" in old.err
    assert main(["suggest", "mlp", "--device-memory", "1GiB"]) == 2
    assert "--world-size" in capsys.readouterr().err


def test_a_width_too_narrow_for_the_table_is_refused_and_a_narrow_terminal_clamped(gpt2_small, monkeypatch):
    # width=5 broke the title into a letter a line (4,675 lines for GPT-2 small's 132) and the pairs' paths
    # mid-name, while the table's rows ran to 60 columns anyway
    for width in (5, 30, 59):
        with pytest.raises(tpflax.OptionError, match=f"width {width} is too narrow.*at least 60 columns"):
            tpflax.report(gpt2_small, width=width)
    lines = tpflax.report(gpt2_small, width=60, pairs=True).splitlines()
    assert lines[0] == "tpflax plan  mesh data=2,model=4  roles data:data," and len(lines) < 300
    # what wraps fits (the title, reasons, totals, pairs); a table row is as wide as its columns (63 here)
    assert max(len(x) for x in lines if not re.match(r"  \S", x)) <= 60
    # a narrow terminal (the default width) is read as 60 columns, not refused
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: os.terminal_size((12, 24)))
    assert tpflax.report(gpt2_small, pairs=True) == "\n".join(lines)


def test_the_title_says_when_the_plan_was_priced_for_the_default_batch(gpt2_small):
    # the reasons' "8192 tokens per step" was the only sign that a plan without batch= was priced for the
    # default batch, not the user's: on a 8 x 32 step a default-priced plan kept token tables whole that the
    # step's own batch splits (1.2-1.4x a hand layout's bytes on five probed LMs, review_s f09)
    title = " ".join(tpflax.report(gpt2_small, width=100).split("\npath")[0].split())  # the title, wrapped
    assert "priced for 8,192 tokens/step (the default: pass batch=, or --batch)" in title
    again = tpflax.Plan.from_json(gpt2_small.to_json())
    assert "priced for 8,192 tokens/step" in tpflax.report(again, full=True).splitlines()[0]
    given = tpflax.plan(zoo.get("gpt2-small").abstract_variables(), "data=2,model=4", batch=(8, 32))
    assert "priced for" not in tpflax.report(given).splitlines()[0]
    # nothing priced (rules decided every leaf, or imported ones): nothing to say of the tokens
    ruled = tpflax.from_rules(zoo.get("gpt2-small").abstract_variables(), [(".*", P())], "data=2,model=4")
    assert ruled.options.get("tokens_from") is None and "priced for" not in tpflax.report(ruled, full=True)
