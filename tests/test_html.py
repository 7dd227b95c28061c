"""The visual report: one self-contained HTML page (tpflax.show, report(fmt="html"), plan --html)."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser

import jax
import optax
import pytest

import tpflax
from tpflax import zoo
from tpflax.cli import main

MESH = {"data": 2, "model": 4}
VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


@pytest.fixture(scope="module")
def gpt2():
    """gpt2-small (real size, abstract) planned on data=2,model=4, one adamw step of batch 32."""
    model = zoo.get("gpt2-small")
    p = tpflax.plan(model.abstract_variables(), MESH)
    est = tpflax.estimate(p, optax.adamw(1e-3), jax.eval_shape(lambda: model.make_batch(0, 32)), model=model)
    return p, est, tpflax.report(p, est, fmt="html")


class Page(HTMLParser):
    """Every start tag with its attributes, checking that non-void tags close in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def svgs(text: str) -> list[ET.Element]:
    """Each inline <svg> parsed as XML (charts and mesh pictures never nest svgs)."""
    return [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", text, flags=re.S)]


def tags(page: Page, name: str, cls: str | None = None) -> list[dict]:
    return [a for t, a in page.tags if t == name and (cls is None or cls in (a.get("class") or "").split())]


def test_page_parses_and_is_self_contained(gpt2):
    p, _, page_text = gpt2
    page = parse(page_text)
    assert page.errors == [] and page.stack == []
    assert page_text.startswith("<!DOCTYPE html>")
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "action", "data"):
            assert name not in attrs, (tag, attrs)  # nothing is loaded: no <script src>, <link href>, <img>
    assert not tags(page, "link") and not tags(page, "iframe") and not tags(page, "img")
    assert [a for a in tags(page, "script")] == [{}]  # one inline script
    # the only URL is the SVG namespace name, which is never fetched
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page_text))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert "@import" not in page_text and "url(" not in page_text


def test_every_svg_is_well_formed_xml(gpt2):
    p, _, page_text = gpt2
    found = svgs(page_text)
    distinct = {(d.shape, d.spec) for d in p.decisions.values()}
    assert len(found) == 2 + len(distinct)  # memory, comm, one mesh picture per (shape, spec)
    assert all(s.tag == "{http://www.w3.org/2000/svg}svg" for s in found)


def test_table_has_one_row_per_group(gpt2):
    p, _, page_text = gpt2
    page = parse(page_text)
    groups = Counter(d.group for d in p.decisions.values())
    bodies = tags(page, "tbody", "group")
    assert len(bodies) == len(groups) == 18  # 12 blocks of 14 leaves fold into 14 rows, plus 4 singles
    assert sorted(int(b["data-count"]) for b in bodies) == sorted(groups.values())
    assert len(tags(page, "tr", "head")) == len(groups)
    assert len(tags(page, "tr", "member")) == sum(n for n in groups.values() if n > 1)
    assert "params/h_*/mlp/c_fc/kernel" in page_text and "×12" in page_text and "×24" in page_text


def test_mesh_picture_has_one_cell_per_device_with_its_slice(gpt2):
    p, _, page_text = gpt2
    meshes = [s for s in svgs(page_text) if s.get("class") == "mesh"]
    assert meshes
    for s in meshes:
        cells = [g for g in s.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "cell"]
        assert sorted(int(c.get("data-device")) for c in cells) == list(range(8))
    # c_fc kernel (768, 3072) P(None, 'model'): device 5 sits at data=1, model=1
    view = next(s for s in meshes if '[:, 768:1536]' in ET.tostring(s, encoding="unicode"))
    by_device = {int(c.get("data-device")): c.get("data-slice")
                 for c in view.iter("{http://www.w3.org/2000/svg}g") if c.get("class") == "cell"}
    assert by_device == {i: f"[:, {768 * (i % 4)}:{768 * (i % 4 + 1)}]" for i in range(8)}


def _segments(page_text: str, chart: str) -> list[dict]:
    svg = next(s for s in svgs(page_text) if s.get("data-chart") == chart)
    return [r.attrib for r in svg.iter("{http://www.w3.org/2000/svg}rect")]


def test_chart_numbers_are_the_estimate(gpt2):
    _, est, page_text = gpt2
    memory = _segments(page_text, "memory")
    for bar, record in (("per_device", est.per_device), ("unsharded", est.unsharded)):
        drawn = {r["data-category"]: int(r["data-bytes"]) for r in memory if r["data-bar"] == bar}
        want = {k: v for k, v in record.to_dict().items() if k != "total" and v}
        assert drawn == want
    comm = {(r["data-axis"], r["data-category"]): float(r["data-bytes"]) for r in _segments(page_text, "comm")}
    want = {(axis, kind): v for kind, by_axis in est.comm.items() for axis, v in by_axis.items()}
    assert comm.keys() == want.keys()
    assert all(abs(comm[k] - want[k]) <= 0.5 for k in want)  # data-bytes is rounded to whole bytes


def test_memory_table_names_the_rows_sum_and_the_peak(gpt2):
    # the text report's last memory row is "sum of rows", beside the peak; the page's table called that sum "total",
    # read as what must fit (the tiny llama's: 1.7 MiB over a 1.5 MiB peak), with no peak beside it
    p, est, page_text = gpt2
    table = page_text.split("<h3>Bytes per device</h3>")[1].split("</table>")[0]
    rows = re.findall(r"<tr><th>([^<]*)</th><th>([^<]*)</th>", table)
    assert rows == [("category", "per device"), ("sum of rows", tpflax.fmt_bytes(est.per_device.total)),
                    ("peak per device", tpflax.fmt_bytes(est.peak))]
    plain = tpflax.report(p, fmt="html").split("<h3>Bytes per device</h3>")[1].split("</table>")[0]
    assert re.findall(r"<tr><th>([^<]*)</th>", plain) == ["category", "total"]  # parameters alone: their total


def test_model_text_is_escaped():
    evil = '<img src=x onerror="alert(1)">&'
    p = tpflax.plan({evil: {"w": jax.ShapeDtypeStruct((16, 16), "float32")}}, {"model": 2})
    text = tpflax.report(p, fmt="html")
    assert evil not in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in text
    page = parse(text)
    assert page.errors == [] and not tags(page, "img")
    svgs(text)  # still well-formed


def test_show_is_an_embeddable_fragment(gpt2):
    p, est, _ = gpt2
    r = tpflax.show(p, est, title="gpt2-small")
    frag = r._repr_html_()
    assert frag.startswith('<div class="tpflax-report"') and "<html" not in frag and "<body" not in frag
    assert parse(frag).errors == []
    other = tpflax.show(p)._repr_html_()  # a second report on the page gets its own root id
    assert re.search(r'id="([^"]+)"', frag).group(1) != re.search(r'id="([^"]+)"', other).group(1)
    assert 'data-chart="comm"' not in other  # no estimate: parameters only
    with pytest.raises(tpflax.OptionError, match="tpflax.Plan"):
        tpflax.show({"not": "a plan"})


def test_cli_plan_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--html", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert parse(text).errors == [] and 'data-chart="comm"' in text  # the default estimate is priced
    assert "optimizer adamw" in text and str(out) in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# Run after the report's own script: remember what it did on load, then click as a reader would.
CLICKS = """<script>
var root = document.querySelector(".tpflax-report"), table = root.querySelector("table.plan");
root.setAttribute("data-load-sorted", table.getAttribute("data-sorted"));
root.setAttribute("data-load-order", Array.from(table.tBodies).map(function (b) {
  return b.rows[0].cells[0].getAttribute("data-v"); }).join("|"));
root.setAttribute("data-load-view", root.getAttribute("data-mesh-view"));
table.querySelector("th[data-col='0']").click();
table.querySelector("tbody[data-count='24'] tr.head td.num").click();
table.querySelector("tbody[data-view='768x3072|None,model'] td.spec").click();
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package `chromium`)")
def test_renders_in_headless_chromium(gpt2, tmp_path):
    p, _, page_text = gpt2
    path = tmp_path / "report.html"
    path.write_text(page_text.replace("</body>", CLICKS + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--dump-dom", path.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    root = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r'<div class="tpflax-report"[^>]*>', dom).group(0)))
    assert root["data-ready"] == "1"  # the report's script ran to its end
    assert dom.count("<svg") == page_text.count("<svg")
    # on load it sorted the groups by bytes per device, largest first ...
    assert root["data-load-sorted"] == "per device desc"
    order = root["data-load-order"].split("|")
    sizes = [sum(d.bytes_per_device for path, d in p.decisions.items() if g in (path, d.group)) for g in order]
    assert len(order) == 18 and order[0] == "params/wte/embedding" and sizes == sorted(sizes, reverse=True)
    # the picker showed the largest sharded leaf (the odd-vocabulary wte is kept whole: an MLP kernel)
    assert root["data-load-view"] == "768x3072|None,model"
    # ... a click on "path" sorts by path, a click on a row opens its group, one on a spec shows its mesh
    table = dom[dom.index('<table class="plan"'):]
    assert re.search(r'<table class="plan"[^>]*data-sorted="path asc"', dom)
    paths = re.findall(r'<tr class="head"><td class="path" data-v="([^"]+)"', table)
    assert paths == sorted(paths)
    assert re.findall(r'<tbody class="group open"[^>]*data-count="(\d+)"', table) == ["24"]
    assert root["data-mesh-view"] == "768x3072|None,model"  # the mlp/c_fc kernels' view
