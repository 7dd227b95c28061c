"""The report's inline style sheet and script (no external assets, no fonts, no network).

Every rule is scoped under ``.tpflax-report`` so that, embedded in a notebook,
the report does not restyle the page around it; the script works only inside
its own root element, so several reports can share one page.
"""

CSS = """
.tpflax-report{--ink:#1f2328;--mute:#656d76;--line:#d8dee4;--soft:#f6f8fa;--accent:#0969da;
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 color:var(--ink);max-width:1360px;margin:0 auto;padding:20px 24px 40px}
.tpflax-report h1{font-size:22px;margin:0 0 4px}
.tpflax-report h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;border-bottom:1px solid var(--line)}
.tpflax-report .sub{color:var(--mute);margin:0 0 14px}
.tpflax-report .mono,.tpflax-report code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 font-size:12.5px}
.tpflax-report .cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.tpflax-report .card{border:1px solid var(--line);border-radius:8px;padding:10px 14px;flex:1 1 150px;
 background:#fff}
.tpflax-report .card b{display:block;font-size:20px;font-weight:600;white-space:nowrap}
.tpflax-report .card span{color:var(--mute);font-size:12.5px}
.tpflax-report .card.warn{border-color:#d4a72c;background:#fff8c5}
.tpflax-report .charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:24px}
.tpflax-report .panel{border:1px solid var(--line);border-radius:8px;padding:12px 16px;background:#fff}
.tpflax-report .panel h3{font-size:14.5px;margin:0 0 2px}
.tpflax-report .panel p{margin:2px 0 8px;color:var(--mute);font-size:12.5px}
.tpflax-report svg text{font:12px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:var(--ink)}
.tpflax-report svg .grid{stroke:#eaeef2;stroke-width:1}
.tpflax-report svg .tick{text-anchor:middle;fill:var(--mute);font-size:11px}
.tpflax-report svg .barlabel{text-anchor:end;font-weight:600}
.tpflax-report svg .seglabel{text-anchor:middle;fill:#fff;font-size:11px;font-weight:600;pointer-events:none}
.tpflax-report svg .total{font-weight:600}
.tpflax-report svg .axislabel{text-anchor:middle;fill:var(--mute);font-size:11.5px;font-weight:600}
.tpflax-report svg .rowlabel{text-anchor:end}
.tpflax-report svg .dev{font-size:11px;fill:var(--mute)}
.tpflax-report svg .slice{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-weight:600}
.tpflax-report svg .cell rect{stroke:#8c959f;stroke-width:1}
.tpflax-report svg .block rect{stroke:#fff;stroke-width:1}
.tpflax-report svg .outline{fill:none;stroke:#57606a;stroke-width:1.2}
.tpflax-report svg .blocklabel{text-anchor:middle;font-size:11px;fill:#24292f}
.tpflax-report .legend{display:flex;flex-wrap:wrap;gap:14px;font-size:12.5px;margin:6px 0}
.tpflax-report .legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;
 vertical-align:-1px}
.tpflax-report table{border-collapse:collapse;width:100%}
.tpflax-report table.nums{width:auto;margin-top:8px;font-size:12.5px}
.tpflax-report table.nums td,.tpflax-report table.nums th{padding:2px 12px 2px 0;text-align:right}
.tpflax-report table.nums td:first-child,.tpflax-report table.nums th:first-child{text-align:left}
.tpflax-report table.plan{font-size:13px}
.tpflax-report table.plan th{position:sticky;top:0;background:var(--soft);text-align:left;cursor:pointer;
 user-select:none;padding:6px 8px;border-bottom:2px solid var(--line);white-space:nowrap}
.tpflax-report table.plan th:hover{background:#eaeef2}
.tpflax-report table.plan th[aria-sort=ascending]::after{content:" ▲";font-size:10px}
.tpflax-report table.plan th[aria-sort=descending]::after{content:" ▼";font-size:10px}
.tpflax-report table.plan td{padding:5px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
.tpflax-report table.plan td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.tpflax-report table.plan td.path{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 font-size:12.5px;white-space:nowrap}
.tpflax-report table.plan td.spec{cursor:pointer;white-space:nowrap;color:var(--accent)}
.tpflax-report table.plan td.reason{color:var(--mute);font-size:12px}
.tpflax-report table.plan td.reason div{max-width:280px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.tpflax-report table.plan tbody.open td.reason div{white-space:normal}
.tpflax-report table.plan tr.head{cursor:pointer}
.tpflax-report table.plan tr.head:hover td{background:#f6f8fa}
.tpflax-report table.plan tr.member{display:none}
.tpflax-report table.plan tr.member td{background:#fbfcfd;font-size:12px;color:var(--mute)}
.tpflax-report table.plan tr.member td.path{padding-left:30px}
.tpflax-report table.plan tbody.open tr.member{display:table-row}
.tpflax-report .toggle{border:0;background:none;cursor:pointer;width:18px;padding:0;margin-right:4px;
 color:var(--mute);font-size:12px}
.tpflax-report tbody.open .toggle{transform:rotate(90deg)}
.tpflax-report .strategy{display:inline-block;padding:0 7px;border-radius:10px;font-size:12px;
 background:#eaeef2;white-space:nowrap}
.tpflax-report .s-column{background:#ddf4ff}.tpflax-report .s-row{background:#fbefff}
.tpflax-report .s-vocab{background:#dafbe1}.tpflax-report .s-fsdp{background:#fff1e5}
.tpflax-report .s-heads{background:#ddf4ff}.tpflax-report .s-expert{background:#ffebe9}
.tpflax-report .share{position:relative;width:90px;height:16px;background:#f0f3f6;border-radius:3px}
.tpflax-report .share b{position:absolute;left:0;top:0;bottom:0;background:#9ec5ee;border-radius:3px}
.tpflax-report .share span{position:relative;font-size:11px;padding-left:4px}
.tpflax-report select{font:inherit;padding:4px 6px;max-width:100%}
.tpflax-report .mesh-view{overflow-x:auto;margin-top:10px}
.tpflax-report .note{color:var(--mute)}
.tpflax-report ul.msgs{padding-left:18px;font-size:13px}
.tpflax-report ul.msgs li{margin:3px 0}
.tpflax-report .tablewrap{max-height:900px;overflow:auto;border:1px solid var(--line);border-radius:8px}
"""

# Sorting, expanding groups and the mesh picker; everything scoped to one root element.
JS = """
(function (root) {
  if (!root) return;
  var table = root.querySelector("table.plan");
  var heads = table.querySelectorAll("thead th");
  function value(tbody, col, type) {
    var v = tbody.rows[0].cells[col].getAttribute("data-v");
    return type === "num" ? parseFloat(v) : v.toLowerCase();
  }
  function sortBy(col, dir) {
    var type = heads[col].getAttribute("data-type");
    var groups = Array.prototype.slice.call(table.tBodies);
    groups.sort(function (a, b) {
      var x = value(a, col, type), y = value(b, col, type);
      return (x < y ? -1 : x > y ? 1 : 0) * dir;
    });
    groups.forEach(function (g) { table.appendChild(g); });
    heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
    heads[col].setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    table.setAttribute("data-sorted", heads[col].textContent + (dir > 0 ? " asc" : " desc"));
  }
  heads.forEach(function (h, col) {
    h.addEventListener("click", function () {
      var numeric = h.getAttribute("data-type") === "num";
      var now = h.getAttribute("aria-sort");
      sortBy(col, now ? (now === "ascending" ? -1 : 1) : (numeric ? -1 : 1));
    });
  });
  var picker = root.querySelector("select.leaf");
  function show(view) {
    root.querySelectorAll(".mesh-view").forEach(function (v) {
      v.hidden = v.getAttribute("data-view") !== view;
    });
    root.setAttribute("data-mesh-view", view);
  }
  if (picker) {
    picker.addEventListener("change", function () {
      show(picker.options[picker.selectedIndex].getAttribute("data-view"));
    });
  }
  table.addEventListener("click", function (e) {
    var tbody = e.target.closest("tbody");
    if (!tbody) return;
    if (e.target.closest("td.spec") && picker) {
      picker.value = tbody.rows[0].cells[0].getAttribute("data-v");
      show(tbody.getAttribute("data-view"));
      picker.scrollIntoView({behavior: "smooth", block: "center"});
    } else if (e.target.closest("tr.head")) {
      tbody.classList.toggle("open");  // members, and the whole reason
    }
  });
  sortBy(parseInt(table.getAttribute("data-sort-on-load"), 10), -1);
  if (picker) show(picker.options[picker.selectedIndex].getAttribute("data-view"));
  root.setAttribute("data-ready", "1");
})(document.getElementById("%ROOT%"));
"""
