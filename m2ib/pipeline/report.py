"""One self-contained HTML page beside a run's table: the table (sortable, with its intervals), the
run's provenance (the .meta.json sidecar), the metric curves, and every pair x method as a thumbnail
(the map over the original image) that opens larger on a click, filterable by a metric's per-pair
value (the *.rows.csv rows) and paged.

Self-contained: images are embedded as data URIs, the script and style are inline, nothing is fetched.
Large runs stay usable: thumbnails are small JPEGs (`thumb_size` px, drawn without matplotlib), images
load lazily, and only one page of `pairs_per_page` pairs is shown at a time. A cell whose map is
missing (e.g. a report rebuilt from an incomplete cache) is drawn as a marked empty cell, and one
line at the top names what is missing.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from m2ib.core.errors import InputError
from m2ib.core.figures import CMAP, PairView, colour_table, text_colour, thumbnail_of
from m2ib.core.registry import check_params

#: conf/config.yaml's `report` block: whether to write the page, pairs per page, thumbnail size (px,
#: longest side; shown at 96 px in the grid and four times larger on a click), JPEG quality.
REPORT_DEFAULTS = {"enabled": True, "pairs_per_page": 50, "thumb_size": 96, "jpeg_quality": 75}
#: rows.csv columns that identify a row rather than measure it.
KEYS = ("sample_id", "method", "modality", "threshold")


def report_settings(cfg: Optional[dict]) -> dict:
    """The report block with defaults filled in, checked (one-line InputError naming the key)."""
    merged = check_params("report", dict(cfg or {}), REPORT_DEFAULTS)
    for key in ("pairs_per_page", "thumb_size"):
        if merged[key] < 1:
            raise InputError(f"report.{key} must be >= 1, got {merged[key]}")
    if not 1 <= merged["jpeg_quality"] <= 95:
        raise InputError(f"report.jpeg_quality must be in 1..95, got {merged['jpeg_quality']}")
    return merged


def _jpeg_uri(image, quality: int) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_uri(path: Path) -> str:
    kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}[path.suffix.lower()]
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def caption_html(words: Sequence[str], scores: Optional[Sequence[float]]) -> str:
    """The caption's words as spans shaded by their (min-max) scores: class s<k> is shade k of 0..255
    (shade_css defines them, text black or white by contrast)."""
    if scores is None:
        return " ".join(html.escape(w) for w in words)
    return " ".join(f'<span class="t s{int(round(float(v) * 255))}" title="{float(v):.2f}">{html.escape(w)}</span>'
                    for w, v in zip(words, scores))


def shade_css(cmap=CMAP) -> str:
    """The 256 token shades of caption_html, each with the text colour that contrasts more."""
    rules = []
    for k, shade in enumerate(colour_table(cmap)):
        rgb = [int(shade[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        rules.append(f".s{k}{{background:{shade};color:{text_colour(rgb)}}}")
    return "".join(rules)


def method_cells(att, settings: dict) -> list[Optional[dict]]:
    """Per row of an Attribution (which carries its samples): {'img': data URI, 'caption': HTML}."""
    cells = []
    for row in range(len(att)):
        pair = PairView.of(att, row)
        cells.append({"img": _jpeg_uri(thumbnail_of(pair, settings["thumb_size"]), settings["jpeg_quality"]),
                      "caption": caption_html(pair.words, pair.scores) if pair.words else ""})
    return cells


def input_cells(samples, frame, settings: dict) -> list[dict]:
    """Per sample: the original image with its boxes and the model's unseen part marked, no map."""
    return [{"img": _jpeg_uri(thumbnail_of(PairView.of_sample(s, frame), settings["thumb_size"], with_map=False),
                              settings["jpeg_quality"]),
             "caption": html.escape(s.caption)} for s in samples]


def _metric_values(rows: Optional[pd.DataFrame]) -> tuple[list[str], dict]:
    """(filterable metric names 'modality:column', {sample_id: {method: {name: value}}}) from rows.csv rows."""
    if rows is None or rows.empty:
        return [], {}
    values, names = {}, []
    for modality, part in rows.groupby("modality", sort=False):
        for col in part.columns:
            if col in KEYS:
                continue
            numbers = pd.to_numeric(part[col], errors="coerce")
            if not numbers.notna().any():
                continue
            name = f"{modality}:{col}"
            names.append(name)
            for sid, method, v in zip(part.sample_id, part.method, numbers):
                if np.isfinite(v):
                    values.setdefault(str(sid), {}).setdefault(method, {})[name] = float(f"{v:.6g}")   # as in rows.csv
    return names, values


def _table_html(table: Optional[pd.DataFrame], by: Sequence[str], values: Sequence[str], digits: int = 3) -> str:
    """The aggregated table as 'mean [low, high]' cells (like the Markdown table), sortable by mean."""
    if table is None or table.empty:
        return "<p>(no aggregated table in this run)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*by, "n", *values])
    body = []
    for _, r in table.iterrows():
        cells = [f"<td>{html.escape(str(r[b]))}</td>" for b in by] + [f'<td data-v="{int(r["n"])}">{int(r["n"])}</td>']
        for v in values:
            m, lo, hi = r[v], r[f"{v}_ci_low"], r[f"{v}_ci_high"]
            if not np.isfinite(m):
                cells.append('<td data-v="">n/a</td>')
                continue
            k = r.get(f"{v}_n", r["n"])
            extra = f" (n={int(k)})" if k != r["n"] else ""
            cells.append(f'<td data-v="{m:.6g}">{m:.{digits}f} <small>[{lo:.{digits}f}, {hi:.{digits}f}]{extra}</small></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wide"><table class="sortable" id="results"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _provenance_html(meta: dict) -> str:
    keys = ["git_commit", "git_clean", "dirty_allowed", "git_dirty_files", "code_version", "data_fingerprint",
            "data_location", "result_identity", "date", "n_samples", "device", "threads", "python"]
    items = "".join(f"<tr><th>{k}</th><td><code>{html.escape(json.dumps(meta.get(k), default=str))}</code></td></tr>"
                    for k in keys if k in meta)
    rest = json.dumps({k: meta[k] for k in meta if k not in keys}, indent=1, sort_keys=True, default=str)
    return (f'<table class="prov">{items}</table><details><summary>settings, packages, seeds, timings '
            f'(the whole sidecar)</summary><pre>{html.escape(rest)}</pre></details>')


def write_report(path, *, title: str, samples: Sequence, inputs: Sequence[dict], cells: dict,
                 meta: dict, settings: dict, table: Optional[pd.DataFrame] = None, by: Sequence[str] = (),
                 values: Sequence[str] = (), rows: Optional[pd.DataFrame] = None,
                 figures: Sequence[Path] = ()) -> Path:
    """Write the page. cells: method -> one entry per sample (method_cells' dicts, None where the map
    is missing); inputs: input_cells(samples); figures: PNG files to embed (metric curves)."""
    ids = [str(s.id) for s in samples]
    for method, column in cells.items():
        if len(column) != len(ids):
            raise InputError(f"report: method {method!r} has {len(column)} cells for {len(ids)} pairs")
    missing = {m: [ids[i] for i, c in enumerate(col) if c is None] for m, col in cells.items()}
    missing = {m: v for m, v in missing.items() if v}
    banner = ""
    if missing:
        parts = "; ".join(f"{m}: {len(v)} pairs ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                          for m, v in missing.items())
        banner = f'<p class="missing" id="missing">Missing maps (no cached row), shown as empty cells: {html.escape(parts)}</p>'
    metric_names, metric_values = _metric_values(rows)
    methods = list(cells)
    grid_rows = []
    for i, sid in enumerate(ids):
        tds = [f'<td class="in"><img loading="lazy" src="{inputs[i]["img"]}" alt="{html.escape(sid)}" '
               f'data-method="input"><div class="cap">{inputs[i]["caption"]}</div></td>']
        for m in methods:
            c = cells[m][i]
            if c is None:
                tds.append(f'<td class="cell miss" data-method="{html.escape(m)}"><div class="nomap">missing</div></td>')
            else:
                tds.append(f'<td class="cell" data-method="{html.escape(m)}"><img loading="lazy" class="thumb" '
                           f'src="{c["img"]}" alt="{html.escape(m)} on {html.escape(sid)}">'
                           f'<div class="cap">{c["caption"]}</div></td>')
        grid_rows.append(f'<tr class="pair" data-id="{html.escape(sid)}"><th>{html.escape(sid)}</th>{"".join(tds)}</tr>')
    figure_html = "".join(f'<figure><img src="{_file_uri(Path(f))}" alt="{html.escape(Path(f).name)}">'
                          f'<figcaption>{html.escape(Path(f).name)}</figcaption></figure>' for f in figures)
    data = {"metrics": metric_values, "pageSize": int(settings["pairs_per_page"])}
    options = "".join(f'<option value="{html.escape(n)}">{html.escape(n)}</option>' for n in metric_names)
    method_options = "".join(f'<option value="{html.escape(m)}">{html.escape(m)}</option>' for m in methods)
    page = _TEMPLATE.format(
        title=html.escape(title), banner=banner, table=_table_html(table, by, values),
        provenance=_provenance_html(meta), figures=figure_html or "<p>(no curves in this run)</p>",
        head="".join(f"<th>{html.escape(m)}</th>" for m in methods), rows="".join(grid_rows),
        metric_options=options, method_options=method_options, n_pairs=len(ids),
        data=json.dumps(data).replace("<", "\\u003c"), style=_STYLE + shade_css(), script=_SCRIPT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


_STYLE = """
body{font:14px system-ui,sans-serif;margin:1em 2em;color:#222}
h2{margin-top:1.5em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}.wide{overflow-x:auto;max-width:100%}
#results th,#results td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
#results th{cursor:pointer;background:#f2f2f2;user-select:none}
#results th.asc:after{content:" \\25B2"}#results th.desc:after{content:" \\25BC"}
.prov{font-size:12px}.prov th{text-align:left;padding-right:1em;vertical-align:top}.prov code{word-break:break-all}
pre{background:#f7f7f7;padding:6px;max-height:24em;overflow:auto;font-size:12px}
figure{display:inline-block;margin:0 1em 1em 0}figure img{max-width:100%}
.missing{background:#fde2e1;border:1px solid #d33;padding:6px}
#controls{position:sticky;top:0;background:#fff;padding:6px 0;z-index:2;border-bottom:1px solid #ddd}
#grid th{font-size:11px;font-weight:normal;padding:2px 4px;max-width:100px;word-break:break-all}
#grid td{padding:2px;vertical-align:top;text-align:center}
#grid tr.pair{display:none}#grid tr.pair.on{display:table-row}
#grid img{width:96px;cursor:zoom-in;display:block}
#grid td.hit img{outline:3px solid #e6007e;outline-offset:-3px}
.cap{font-size:9px;max-width:96px;text-align:left;line-height:1.5}
#viewer .cap, #v-cap{font-size:15px;max-width:none}
.nomap{width:96px;height:80px;background:repeating-linear-gradient(45deg,#eee,#eee 6px,#ccc 6px,#ccc 12px);
 color:#a00;font-weight:bold;line-height:80px}
.t{padding:0 2px;border-radius:2px;display:inline-block}
#viewer{display:none;position:fixed;inset:0;background:rgba(0,0,0,.75);z-index:5}
#viewer.open{display:flex;align-items:center;justify-content:center}
#viewer .box{background:#fff;padding:1em;max-width:90vw;max-height:90vh;overflow:auto}
#viewer img{width:384px;image-rendering:auto}
"""

_SCRIPT = r"""
(function(){
const data=JSON.parse(document.getElementById('report-data').textContent);
const rows=[...document.querySelectorAll('#grid tbody tr.pair')];
let page=0, shown=rows;
function test(v,op,x){return op==='<'?v<x:op==='<='?v<=x:op==='='?Math.abs(v-x)<1e-9:op==='>='?v>=x:v>x;}
function applyFilter(){
  const metric=document.getElementById('f-metric').value, method=document.getElementById('f-method').value;
  const op=document.getElementById('f-op').value, x=parseFloat(document.getElementById('f-value').value);
  const active=metric!=='' && !isNaN(x);
  shown=[];
  for(const tr of rows){
    const per=data.metrics[tr.dataset.id]||{}; let keep=!active;
    for(const td of tr.querySelectorAll('td.cell')){
      const m=td.dataset.method, v=(per[m]||{})[metric];
      const hit=active && v!==undefined && (method==='' || method===m) && test(v,op,x);
      td.classList.toggle('hit',hit); keep=keep||hit;
    }
    if(keep) shown.push(tr);
  }
  page=0; render();
}
function render(){
  const n=Math.max(1,Math.ceil(shown.length/data.pageSize));
  page=Math.min(Math.max(page,0),n-1);
  const lo=page*data.pageSize, hi=lo+data.pageSize, on=new Set(shown.slice(lo,hi));
  for(const tr of rows) tr.classList.toggle('on',on.has(tr));
  document.getElementById('status').textContent=`pairs ${shown.length?lo+1:0}-${Math.min(hi,shown.length)} of ${shown.length} shown (${rows.length} in the run), page ${page+1} of ${n}`;
}
document.getElementById('f-apply').onclick=applyFilter;
document.getElementById('f-reset').onclick=()=>{document.getElementById('f-metric').value='';applyFilter();};
document.getElementById('prev').onclick=()=>{page--;render();};
document.getElementById('next').onclick=()=>{page++;render();};
const viewer=document.getElementById('viewer');
document.getElementById('grid').addEventListener('click',e=>{
  const img=e.target.closest('img'); if(!img) return;
  const td=img.closest('td'), tr=img.closest('tr'), m=td.dataset.method||'input';
  const cap=(td.querySelector('.cap')||{}).innerHTML||'';
  const vals=(data.metrics[tr.dataset.id]||{})[m]||{};
  document.getElementById('v-img').src=img.src;
  document.getElementById('v-title').textContent=`${m} on ${tr.dataset.id}`;
  document.getElementById('v-cap').innerHTML=cap;
  document.getElementById('v-vals').textContent=Object.entries(vals).map(([k,v])=>`${k} = ${v}`).join('\n');
  viewer.classList.add('open');
});
viewer.onclick=()=>viewer.classList.remove('open');
// The address's #fragment can preset the view (links, and the headless-browser test): e.g.
// #method=gradcam&metric=image:pointing_game&op==&value=0&page=2&open=<pair id>/<method>
const want=new URLSearchParams(location.hash.slice(1));
for(const [key,id] of [['method','f-method'],['metric','f-metric'],['op','f-op'],['value','f-value']])
  if(want.has(key)) document.getElementById(id).value=want.get(key);
document.querySelectorAll('table.sortable th').forEach((th,col)=>th.onclick=()=>{
  const body=th.closest('table').tBodies[0], asc=!th.classList.contains('asc');
  th.parentNode.querySelectorAll('th').forEach(h=>h.classList.remove('asc','desc'));
  th.classList.add(asc?'asc':'desc');
  const key=td=>{const v=td.dataset.v; return v===undefined?td.textContent:(v===''?NaN:parseFloat(v));};
  [...body.rows].sort((a,b)=>{const x=key(a.cells[col]),y=key(b.cells[col]);
    if(typeof x==='string') return asc?x.localeCompare(y):y.localeCompare(x);
    if(isNaN(x)) return 1; if(isNaN(y)) return -1; return asc?x-y:y-x;}).forEach(r=>body.appendChild(r));
});
applyFilter();
if(want.has('page')){page=parseInt(want.get('page'))-1; render();}
if(want.has('open')){const [id,m]=want.get('open').split('/');
  const tr=rows.find(r=>r.dataset.id===id), img=tr&&tr.querySelector(`td[data-method="${CSS.escape(m)}"] img`);
  if(img) img.click();}
document.body.dataset.ready='1';
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<style>{style}</style></head>
<body data-ready="0">
<h1>{title}</h1>
{banner}
<h2>Table</h2>
<p>Mean [95% bootstrap interval]; click a column to sort.</p>
{table}
<h2>Provenance</h2>
{provenance}
<h2 id="pairs">Pairs x methods</h2>
<p>Each map is drawn over the original image; the hatched part was cropped away by the model's preprocessing;
white boxes are the ground truth. Click a thumbnail to enlarge it with its caption's token scores.</p>
<div id="controls">
 Show pairs where <select id="f-method"><option value="">any method</option>{method_options}</select>
 has <select id="f-metric"><option value="">(no filter)</option>{metric_options}</select>
 <select id="f-op"><option>&lt;</option><option>&lt;=</option><option selected>=</option><option>&gt;=</option><option>&gt;</option></select>
 <input id="f-value" type="number" step="any" value="0" size="6">
 <button id="f-apply">filter</button> <button id="f-reset">show all</button>
 &nbsp; <button id="prev">&larr; previous</button> <button id="next">next &rarr;</button>
 <span id="status">{n_pairs} pairs (script not run)</span>
</div>
<noscript><p class="missing">The pairs grid needs JavaScript (inline, no network access).</p></noscript>
<table id="grid"><thead><tr><th>pair</th><th>input</th>{head}</tr></thead><tbody>{rows}</tbody></table>
<h2>Curves</h2>
{figures}
<div id="viewer"><div class="box"><h3 id="v-title"></h3><img id="v-img" alt="enlarged"><p id="v-cap"></p><pre id="v-vals"></pre></div></div>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body></html>
"""
