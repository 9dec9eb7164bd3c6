"""The audit report (``fastfair report RUN_DIR``): one self-contained HTML page (inline SVG plots, base64 PNG images).

Sections: the run's headline numbers; mIoU / mSoftIoU per profession with bootstrap CIs (open-vocabulary
and in-prompt); heat-map overlays of the most and least entangled images; output distributions per
profession against the target, with DFT bias / Delta / KL / target gap / risk difference; intersectional
tables; prompt adherence of in-prompt images; the settings. No plotting library is needed.

The page carries a small script (sortable tables) and a guard that prints any script error into
the page (``#js-errors``) and sets ``<body data-ready="1">`` once the page has been set up.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .attributes import slug
from .._io import atomic_write
from .store import REPORT, RunStore

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#1b9e77", "#d95f02", "#7570b3", "#e7298a")
E = html.escape


def _fmt(x, nd=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _ci_text(d, nd=3) -> str:
    if not d or d.get("mean") is None:
        return "–"
    mark = "<sup title='the estimate lies outside its bootstrap interval (small-sample bias)'>†</sup>" \
        if d.get("outside") else ""
    return f"{_fmt(d['mean'], nd)}{mark} <span class=ci>[{_fmt(d['lo'], nd)}, {_fmt(d['hi'], nd)}]</span>"


def _any_outside(x) -> bool:
    """Whether a summary holds an interval that excludes its estimate."""
    if isinstance(x, dict):
        return bool(x.get("outside")) or any(_any_outside(v) for v in x.values())
    return isinstance(x, list) and any(_any_outside(v) for v in x)


# ------------------------------------------------------------------------------------------ SVG plots

def svg_ci_bars(items, title: str, xmax: float = 1.0) -> str:
    """Horizontal bars of (label, mean, lo, hi), sorted by mean (largest first), with CI whiskers."""
    items = [it for it in items if it[1] is not None]
    items.sort(key=lambda t: -t[1])
    if not items:
        return "<p class=muted>no values</p>"
    lw, bw, rh, pad = 190, 420, 18, 30
    h = pad + rh * len(items) + 24
    w = lw + bw + 70
    out = [f'<svg class=plot xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'role="img" aria-label="{E(title)}">',
           f'<text x="{lw}" y="16" class=t>{E(title)}</text>']
    for k in range(0, 6):
        x = lw + bw * k / 5
        out.append(f'<line x1="{x:.1f}" y1="{pad - 6}" x2="{x:.1f}" y2="{h - 20}" class=grid />'
                   f'<text x="{x:.1f}" y="{h - 6}" class=ax text-anchor="middle">{xmax * k / 5:.1f}</text>')
    for i, (label, m, lo, hi) in enumerate(items):
        y = pad + i * rh
        bar = max(0.0, min(1.0, m / xmax)) * bw
        out.append(f'<text x="{lw - 6}" y="{y + rh * 0.7:.1f}" class=lab text-anchor="end">{E(str(label))}</text>')
        out.append(f'<rect x="{lw}" y="{y + 3}" width="{bar:.1f}" height="{rh - 6}" fill="{PALETTE[0]}">'
                   f'<title>{E(str(label))}: {m:.3f} [{_fmt(lo)}, {_fmt(hi)}]</title></rect>')
        if lo is not None and hi is not None:
            x0, x1 = lw + max(0, min(1, lo / xmax)) * bw, lw + max(0, min(1, hi / xmax)) * bw
            yc = y + rh / 2
            out.append(f'<line x1="{x0:.1f}" y1="{yc:.1f}" x2="{x1:.1f}" y2="{yc:.1f}" class=wh />'
                       f'<line x1="{x0:.1f}" y1="{yc - 4:.1f}" x2="{x0:.1f}" y2="{yc + 4:.1f}" class=wh />'
                       f'<line x1="{x1:.1f}" y1="{yc - 4:.1f}" x2="{x1:.1f}" y2="{yc + 4:.1f}" class=wh />')
        out.append(f'<text x="{lw + bw + 6}" y="{y + rh * 0.7:.1f}" class=ax>{m:.3f}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_stacked(rows, labels, target, title: str) -> str:
    """One stacked bar of class frequencies per row (label, [f_k]); dashed lines mark the target's
    cumulative boundaries."""
    rows = [(lab, f) for lab, f in rows if f is not None and all(x is not None for x in f)]
    if not rows:
        return "<p class=muted>no classified images</p>"
    lw, bw, rh, pad = 190, 420, 18, 30
    w = lw + bw + 30
    legend, x, y = [], lw, 0  # legend entries wrap onto more lines
    for k, lab in enumerate(labels):
        step = 22 + 7 * len(lab)
        if x + step > w and x > lw:
            x, y = lw, y + 16
        legend.append((x, y, k, lab))
        x += step
    h = pad + rh * len(rows) + 48 + y
    out = [f'<svg class=plot xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'role="img" aria-label="{E(title)}">', f'<text x="{lw}" y="16" class=t>{E(title)}</text>']
    for i, (name, f) in enumerate(rows):
        y = pad + i * rh
        out.append(f'<text x="{lw - 6}" y="{y + rh * 0.7:.1f}" class=lab text-anchor="end">{E(str(name))}</text>')
        x = lw
        for k, v in enumerate(f):
            wd = v * bw
            if wd > 0:
                out.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{wd:.1f}" height="{rh - 4}" '
                           f'fill="{PALETTE[k % len(PALETTE)]}"><title>{E(str(name))} – {E(labels[k])}: '
                           f'{100 * v:.1f}%</title></rect>')
            x += wd
    c = 0.0
    for t in target[:-1]:
        c += t
        xt = lw + c * bw
        out.append(f'<line x1="{xt:.1f}" y1="{pad - 4}" x2="{xt:.1f}" y2="{pad + rh * len(rows) + 2}" class=target />')
    ly = pad + rh * len(rows) + 18
    for x, dy, k, lab in legend:
        out.append(f'<rect x="{x:.1f}" y="{ly + dy - 9}" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"/>'
                   f'<text x="{x + 14:.1f}" y="{ly + dy}" class=ax>{E(lab)}</text>')
    ly += legend[-1][1] if legend else 0
    out.append(f'<text x="{lw}" y="{ly + 18}" class=ax>dashed: target '
               f'{E(" / ".join(f"{100 * t:.0f}%" for t in target))}</text>')
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------ images

def _b64_png(img) -> str:
    """A thumbnail as an embedded JPEG (quality 85): 5-10x smaller than PNG for photographs (a 12-image audit's page
    was 1.4 MB, 99% PNG), so reports stay small enough to mail and host."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(img, size=160):
    from PIL import Image

    img = img.convert("RGB")
    if max(img.size) > size:
        img = img.resize((size, round(size * img.size[1] / img.size[0])), Image.BILINEAR)
    return img


class _Maps:
    def __init__(self, root: Path):
        self.root = root
        self._open: dict = {}

    def get(self, shard, key):
        """The map, or why there is none: "no map saved" (the run saved none for this image) or "map file
        missing" (the row names a shard or key that is not there: a moved, deleted or still-written run)."""
        if not isinstance(shard, str) or not shard:
            return "no map saved"
        from safetensors import safe_open

        if shard not in self._open:
            p = self.root / shard
            if not p.exists():
                return "map file missing"
            try:
                self._open[shard] = safe_open(str(p), framework="pt")
            except Exception:  # a damaged shard (safetensors' error is no OSError): the cell says so, the page is made
                self._open[shard] = None
        f = self._open[shard]
        if f is None:
            return "map file unreadable"
        try:
            return f.get_tensor(key).float() if key in f.keys() else "map file missing"
        except Exception:
            return "map file unreadable"


def _overlay_cells(root: Path, maps: _Maps, row, mode_key: str, words: tuple[str, str], value: float) -> str:
    from PIL import Image

    from ..generation import overlay

    p = root / row["image"]
    if not p.exists():
        return "<td>image missing</td>"
    try:
        img = Image.open(p).convert("RGB")
    except OSError:  # damaged (a missing one was tolerated; a damaged one aborted the whole report)
        return "<td>image unreadable</td>"
    cells = [f'<figure><img src="{_b64_png(_thumb(img))}" alt="generated image: {E(str(row["profession"]))}, '
             f'seed {int(row["seed"])}"><figcaption>seed {int(row["seed"])}'
             f'</figcaption></figure>']
    for role, word in zip(("profession", "attribute"), words):
        m = maps.get(row.get("maps"), f"{row['work_id']}:{mode_key}:{role}")
        if isinstance(m, str):  # why there is no map
            cells.append(f"<figure><figcaption>{m}</figcaption></figure>")
            continue
        cells.append(f'<figure><img src="{_b64_png(_thumb(overlay(img, m)))}" alt="attention map of “{E(word)}” '
                     f'over the image of seed {int(row["seed"])}">'
                     f'<figcaption>“{E(word)}”</figcaption></figure>')
    return (f'<div class=ov><div class=ovh>{E(str(row["profession"]))} · IoU {value:.3f}</div>'
            + "".join(cells) + "</div>")


def _extremes(df, col, k):
    d = df[np.isfinite(df[col].to_numpy(dtype=float))]
    if not len(d):
        return [], []
    d = d.sort_values(col, kind="stable")
    k = min(k, max(1, len(d) // 2))  # the two lists never share an image
    hi = d.iloc[::-1].head(k)
    lo = d.head(k) if len(d) > 1 else d.head(0)
    return [r for _, r in hi.iterrows()], [r for _, r in lo.iterrows()]


# ------------------------------------------------------------------------------------------ page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px}
body{color:#222;background:#fff;padding:0 16px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid #4e79a7}
h3{font-size:15px;margin:18px 0 6px}
.muted,.ci{color:#777}
.ci{font-size:12px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f5f8;cursor:pointer;user-select:none}
td:first-child,th:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{border:1px solid #dde;border-radius:6px;padding:8px 12px;background:#f8f9fc}
.card b{display:block;font-size:20px}
svg.plot{display:block;margin:6px 0}
svg .t{font-weight:600;font-size:13px}
svg .lab{font-size:12px}
svg .ax{font-size:11px;fill:#555}
svg .grid{stroke:#e5e5e5}
svg .wh{stroke:#222;stroke-width:1.2}
svg .target{stroke:#111;stroke-dasharray:4 3;stroke-width:1.5}
.ovs{display:flex;flex-wrap:wrap;gap:14px}
.ov{border:1px solid #ddd;border-radius:6px;padding:6px;display:flex;flex-wrap:wrap;gap:6px;max-width:480px}
.ovh{width:100%;font-weight:600}
figure{margin:0;text-align:center}
figure img{display:block;width:148px;image-rendering:auto}
figcaption{font-size:12px;color:#555}
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:12px;max-height:520px}
.tw{overflow-x:auto;max-width:100%}
.warn{background:#fff6e0;border:1px solid #e0a800;padding:6px 10px}
#js-errors:empty{display:none}
#js-errors{background:#fee;border:1px solid #c00;padding:8px;color:#900}
"""

SCRIPT = """
(function(){
  var box=document.getElementById('js-errors');
  function report(msg){
    if(box){ var d=document.createElement('div'); d.textContent='script error: '+msg; box.appendChild(d); }
  }
  window.addEventListener('error', function(e){ report(e.message||String(e)); });
  window.addEventListener('unhandledrejection', function(e){ report(String(e.reason)); });
  try {
    var tables=document.querySelectorAll('table.sortable');
    tables.forEach(function(tb){
      var ths=tb.tHead?tb.tHead.rows[0].cells:[];
      Array.prototype.forEach.call(ths,function(th,ci){
        th.title='click (or Enter) to sort';
        th.tabIndex=0;
        th.addEventListener('keydown',function(e){ if(e.key==='Enter'||e.key===' '){ e.preventDefault(); th.click(); } });
        th.addEventListener('click',function(){
          var body=tb.tBodies[0], rows=Array.prototype.slice.call(body.rows);
          var asc=th.getAttribute('data-dir')!=='asc';
          Array.prototype.forEach.call(ths,function(h){h.removeAttribute('data-dir');});
          th.setAttribute('data-dir',asc?'asc':'desc');
          Array.prototype.forEach.call(ths,function(h){h.removeAttribute('aria-sort');});
          th.setAttribute('aria-sort',asc?'ascending':'descending');
          function key(r){ var c=r.cells[ci]; var v=c.getAttribute('data-v'); if(v===null) v=c.textContent;
            var n=parseFloat(v); return isNaN(n)?v.toLowerCase():n; }
          rows.sort(function(a,b){
            var x=key(a), y=key(b); if(x<y) return asc?-1:1; if(x>y) return asc?1:-1; return 0;
          });
          rows.forEach(function(r){ body.appendChild(r); });
        });
      });
    });
    document.body.setAttribute('data-ready','1');
  } catch (err) { report(err && err.message ? err.message : String(err)); }
})();
"""


def _table(head, rows, cls="sortable") -> str:
    h = "".join(f"<th scope=col>{x}</th>" for x in head)
    body = []
    for r in rows:
        cells = []
        for c in r:
            if isinstance(c, tuple):  # (html, sort value)
                cells.append(f'<td data-v="{E(str(c[1]))}">{c[0]}</td>')
            else:
                cells.append(f"<td>{c}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class=tw><table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{"".join(body)}</tbody>'
            '</table></div>')


def _sv(d):
    return "" if not d or d.get("mean") is None else d["mean"]


def _share_table(blocks: dict, per: str, title: str, blurb: str, head: list) -> list[str]:
    """A section of per-set shares ({set: {"overall", "n", per: {class: share}}}), or nothing."""
    if not blocks:
        return []
    def word(a, k, v):  # the share and, in runs that record it, how many images it is of
        n = (a.get(per + "_n") or {}).get(k)
        return f"{E(k)} {100 * v:.0f}%" + (f" of {n}" if n is not None else "")

    rows = [[E(n), f"{100 * a['overall']:.1f}%" if a["overall"] is not None else "–", a["n"]]
            + [", ".join(word(a, k, v) for k, v in a[per].items() if v is not None)]
            for n, a in blocks.items()]
    return [f"<h2>{E(title)}</h2><p>{E(blurb)}</p>", _table(head, rows)]


def _mitigation(gen: dict) -> str:
    """The mitigations the audited images were generated with, for the page's header."""
    out = []
    eg = gen.get("edit_guidance")
    if eg:
        if eg["method"] == "fair-diffusion":  # joint: each attribute's groups, "female, male × White, ..."
            out.append("Fair Diffusion (" + " × ".join(", ".join(p["choices"]) for p in eg.get("parts", [eg])) + ")")
        else:
            out.append("SEGA (" + "; ".join(("−" if r else "+") + p for p, r in zip(eg["prompts"], eg["reverse"]))
                       + ")")
    g = gen.get("guide")
    if g:
        out.append(f"entanglement guidance ({g['attribute']}, scale {g.get('scale', 100.0)})")
    return (" · mitigation: " + E(" + ".join(out))) if out else ""


def build_html(root: Path, df, config: dict, summary: dict, k_extremes: int = 3) -> str:
    st = config["settings"]
    profs = summary.get("professions", [])
    parts = []
    title = f"fastfair audit – {st['model']}"
    n_seeds = len(config["work"]["seeds"])
    cards = [("images", summary.get("n_images", 0)), ("professions", len(profs)), ("seeds per prompt", n_seeds),
             ("attribute sets", E(", ".join(st["attributes"]))),
             ("entanglement", E(", ".join(st["entanglement"]) or "none"))]
    ent = summary.get("entanglement", {})
    for w, blk in ent.get("open", {}).items():
        cards.append((f"mIoU profession ↔ “{w}”", _ci_text(blk["iou"]["overall"])))
    parts.append(f"<h1>{E(title)}</h1><p class=muted>{E(config.get('created', ''))} · "
                 f"template “{E(st['template'])}” · "
                 + (f"every prompt starts with {E(st['prompt_prefix'])} (soft tokens) · " if st.get("prompt_prefix")
                    else "") +
                 f"{st['generation']['steps']} steps, "
                 + (f"guidance {st['generation']['guidance_scale']}, " if st['generation'].get('guidance_scale') is not None
                    else "no guidance input, ") +
                 f"{st['generation']['width']}×{st['generation']['height']}, {E(st['dtype'])}"
                 + _mitigation(st['generation'])
                 + (f" · distributions of each image's largest face ({E(str(st['classifier']['face_crops']))}; "
                    "images without a face are abstentions)"
                    if isinstance(st.get("classifier"), dict) and st["classifier"].get("face_crops") else "")
                 + "</p>")
    if config.get("targets_override"):
        parts.append("<p class=warn>Targets overridden for this page: "
                     + E(", ".join(f"{k} = {' / '.join(f'{100 * x:g}%' for x in v)}"
                                   for k, v in config["targets_override"].items()))
                     + ". The run's summary.json and audit.json keep the targets it was run with.</p>")
    envs = config.get("environments") or []
    if len(envs) > 1:
        parts.append(f"<p class=warn>This run's images were made in {len(envs)} different environments (library "
                     "versions, device or fastfair revision: see Settings, environments) -- it was resumed "
                     "elsewhere.</p>")
    planned = summary.get("n_planned")
    if planned and summary.get("n_images", 0) < planned:
        parts.append(f'<p class=warn>Partial run: {summary["n_images"]} of {planned} planned images are finished; '
                     "resume the audit (--resume) for the rest.</p>")
    if summary.get("safety_blocked"):
        parts.append(f'<p class=warn>The pipeline\'s safety checker blacked out {summary["safety_blocked"]} image(s): '
                     "their maps are measured, but the classifier abstains on them (left out of the frequencies, "
                     "counted as abstained) and they have no CLIP score. Which images it blocks can itself depend on "
                     "the people drawn; audit with safety_checker=None to see every image.</p>")
    parts.append("<div class=cards>" + "".join(f"<div class=card>{E(str(k))}<b>{v}</b></div>" for k, v in cards)
                 + "</div>")
    maps = _Maps(root)
    neutral = df[df["kind"] == "neutral"] if len(df) else df

    # ---- entanglement
    if ent:
        parts.append("<h2>Entanglement (cross-attention overlap)</h2>"
                     f"<p>IoU of the profession's and the attribute word's maps, each binarised at its own "
                     f"{st['metrics']['percentile']:g}th percentile (BiasMap), and SoftIoU (Sinkhorn top-"
                     f"{st['metrics']['soft_iou']['top_k']}); mean per profession with a "
                     f"{100 * summary['bootstrap']['level']:.0f}% bootstrap CI ({summary['bootstrap']['n_boot']} "
                     "resamples of the images, fixed seed). Overall = mean over professions.</p>")
    for w, blk in ent.get("open", {}).items():
        parts.append(f"<h3>Open vocabulary: “{E(w)}” (sets {E(', '.join(blk['sets']))}) – "
                     "attribution prompt e.g. "
                     f"“{E(blk['attribution_example'])}”</h3>")
        parts.append(f"<p>mIoU {_ci_text(blk['iou']['overall'])} · "
                     f"mSoftIoU {_ci_text(blk['soft_iou']['overall'])}</p>")
        items = [(p, v["mean"], v["lo"], v["hi"]) for p, v in blk["iou"]["per_profession"].items()]
        parts.append(svg_ci_bars(items, f"mIoU(profession, {w}) per profession"))
        rows = [[E(p), (_ci_text(blk["iou"]["per_profession"][p]), _sv(blk["iou"]["per_profession"][p])),
                 (_ci_text(blk["soft_iou"]["per_profession"][p]), _sv(blk["soft_iou"]["per_profession"][p])),
                 blk["iou"]["per_profession"][p]["n"]] for p in profs]
        parts.append(_table(["profession", "mIoU", "mSoftIoU", "images"], rows))
        col = f"iou_open_{slug(w)}"
        if col in neutral.columns:
            hi, lo = _extremes(neutral, col, k_extremes)
            for name, rs in (("most", hi), ("least", lo)):
                parts.append(f"<h3>{name.capitalize()} entangled images (“{E(w)}”)</h3><div class=ovs>"
                             + "".join(_overlay_cells(root, maps, r, f"open:{slug(w)}", (r["profession"], w), r[col])
                                       for r in rs) + "</div>")
    for name, blk in ent.get("inprompt", {}).items():
        parts.append(f"<h3>In-prompt: {E(name)} words in the prompt (“{E(st['inprompt_template'])}”)</h3>")
        parts.append(f"<p>mIoU {_ci_text(blk['iou']['overall'])} · mSoftIoU {_ci_text(blk['soft_iou']['overall'])} · "
                     "per word: " + ", ".join(f"{E(lab)} {_ci_text(v)}" for lab, v in blk["per_label"].items())
                     + "</p>")
        items = [(p, v["mean"], v["lo"], v["hi"]) for p, v in blk["iou"]["per_profession"].items()]
        parts.append(svg_ci_bars(items, f"in-prompt mIoU(profession, {name} word) per profession"))
        ip_prof = [p for p in profs if p in blk["iou"]["per_profession"]]
        parts.append(_table(["profession", "mIoU", "mSoftIoU", "images"],
                            [[E(p), (_ci_text(blk["iou"]["per_profession"][p]), _sv(blk["iou"]["per_profession"][p])),
                              (_ci_text(blk["soft_iou"]["per_profession"][p]),
                               _sv(blk["soft_iou"]["per_profession"][p])),
                              blk["iou"]["per_profession"][p]["n"]] for p in ip_prof]))
        rows_ip = df[(df["kind"] == "inprompt") & (df["attribute"] == name)]
        if len(rows_ip):
            hi, lo = _extremes(rows_ip, "iou_inprompt", k_extremes)
            for nm, rs in (("most", hi), ("least", lo)):
                parts.append(f"<h3>{nm.capitalize()} entangled in-prompt images ({E(name)})</h3><div class=ovs>"
                             + "".join(_overlay_cells(root, maps, r, "inprompt:", (r["profession"], r["word"]),
                                                      r["iou_inprompt"]) for r in rs) + "</div>")

    # ---- distributions
    dist = summary.get("distribution", {})
    if dist:
        clf = st.get("classifier") or {}
        parts.append("<h2>Output distribution</h2>"
                     f"<p>Classifier: {E(clf.get('type', '?'))} {E(str(clf.get('model', clf.get('module', ''))))}. "
                     "Frequencies of the argmax class over each profession's neutral images; DFT bias = mean "
                     "|f<sub>i</sub>−f<sub>j</sub>| over class pairs; Δ = |p−0.5|/0.5 (binary); "
                     "KL to uniform (nats); "
                     "gap = mean |f<sub>k</sub>−target<sub>k</sub>|; RD = f(first class) − f(second class).</p>")
        abst = {n: b.get("overall", {}).get("abstained", 0) for n, b in dist.items() if "parts" not in b}
        if any(abst.values()):
            parts.append("<p class=warn>The classifier abstained (no probabilities: no face found, an image the "
                         "safety checker blacked out, or a NaN row from the classifier) on "
                         + "; ".join(f"{v} image(s) for {E(n)}" for n, v in abst.items() if v)
                         + ". Those images are left out of the frequencies below; if they are many, or could depend "
                         "on the group shown, the frequencies are biased.</p>")
    for name, blk in dist.items():
        if "parts" in blk:
            continue
        labels = blk["labels"]
        parts.append(f"<h3>{E(name)}</h3>")
        ov = blk["overall"]
        metric_names = [m for m in ("dft_bias", "delta", "kl_uniform", "target_gap", "risk_difference") if m in ov]
        def metric_title(m):  # the legend's names; the risk difference says which class minus which
            return E({"dft_bias": "DFT bias", "delta": "Δ", "kl_uniform": "KL to uniform", "target_gap": "gap to target",
                      "risk_difference": f"RD ({labels[0]} − {labels[1]})" if len(labels) == 2 else "RD"}[m])

        parts.append(_table(["overall"] + [metric_title(m) for m in metric_names],
                            [["mean over professions"] + [_ci_text(ov[m]) for m in metric_names]], cls="plain"))
        rows_f = [(p, blk["per_profession"][p]["freq"]) for p in profs]
        parts.append(svg_stacked(rows_f, labels, blk["target"], f"{name}: class frequencies per profession"))
        # n: classified images; abstained: images the classifier gave no class (no face, a blacked-out image)
        head = ["profession", "n", "abstained"] + [E(lab) for lab in labels] + [metric_title(m) for m in metric_names]
        rows = []
        for p in profs:
            e = blk["per_profession"][p]
            rows.append([E(p), e["n"], e.get("abstained", 0)]
                        + [(f"{100 * f:.1f}%", f) if f is not None else "–" for f in e["freq"]]
                        + [(_ci_text(e[m]), _sv(e[m])) for m in metric_names])
        parts.append(_table(head, rows))
    inters = [(n, b) for n, b in dist.items() if "parts" in b]
    if inters:
        parts.append("<h2>Intersections</h2>")
    for name, blk in inters:
        labels = blk["labels"]
        ov = blk["overall"]
        parts.append(f"<h3>{E(name)}</h3><p>DFT bias over the {len(labels)} joint classes: "
                     f"{_ci_text(ov['dft_bias'])} · KL to uniform {_ci_text(ov['kl_uniform'])} · "
                     f"gap to target {_ci_text(ov['target_gap'])}</p>")
        head = ["profession", "n"] + [E(lab.replace("|", " · ")) for lab in labels] + ["DFT bias"]
        rows = []
        for p in profs:
            e = blk["per_profession"][p]
            cells = []
            for f in e["freq"]:
                if f is None:
                    cells.append("–")
                else:
                    a = min(1.0, f * len(labels) / 2)
                    cells.append((f'<span style="background:rgba(78,121,167,{a:.2f});padding:0 4px">'
                                  f'{100 * f:.0f}%</span>', f))
            rows.append([E(p), e["n"]] + cells + [(_ci_text(e["dft_bias"]), _sv(e["dft_bias"]))])
        pooled = (ov.get("pooled") or {}).get("dft_bias")
        rows.append(["<b>all (pooled)</b>", ov["n"]] + [f"{100 * f:.0f}%" if f is not None else "–"
                                                       for f in ov["freq_pooled"]]
                    + [_fmt(pooled, 3) if pooled is not None else "–"])
        rows.append(["<b>mean over professions</b>", ""] + [""] * len(labels) + [_ci_text(ov["dft_bias"])])
        parts.append(_table(head, rows))
    cs = summary.get("clip_score")
    if cs:
        items = [(p, v["mean"], v.get("lo"), v.get("hi")) for p, v in cs["per_profession"].items()]
        top = max([v[3] or v[1] or 0 for v in items] + [1.0])
        parts.append("<h2>Prompt alignment (CLIP score)</h2><p>100 · max(cos(image, prompt), 0) with "
                     f"{E(str(st['clip_score'].get('model')))}, neutral images: overall {_ci_text(cs['overall'], 2)}"
                     "</p>" + svg_ci_bars(items, "CLIP score per profession", xmax=float(np.ceil(top / 10) * 10)))
    parts += _share_table(summary.get("adherence", {}), "per_label", "Prompt adherence (in-prompt images)",
                          "Share of in-prompt images whose predicted class is the word in the prompt – a check of "
                          "the classifier and the model together.", ["attribute set", "adherence", "images", "per word"])
    parts += _share_table(summary.get("steering", {}), "per_target", "Fair Diffusion steering (neutral images)",
                          "Share of neutral images whose predicted class is the group Fair Diffusion steered them to.",
                          ["attribute set", "on target", "images", "per group"])
    if _any_outside(summary):
        parts.append("<p class=muted>† The estimate lies outside its 95% bootstrap interval: DFT bias, KL and gaps "
                     "are built on |·| and logs, so with few images per profession their resamples sit above the "
                     "estimate. More seeds per prompt narrow the bias and the interval.</p>")
    parts.append("<h2>Settings</h2><pre>" + E(json.dumps(config, indent=2, ensure_ascii=False)) + "</pre>")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
            f"<title>{E(title)}</title><style>{CSS}</style></head><body>"
            "<div id=js-errors></div>" + "\n".join(parts)
            + f"<p class=muted>Written by fastfair {E(str(config.get('fastfair_version', '')))}.</p>"
            f"<script>{SCRIPT}</script></body></html>")


def write_report(run_dir, out=None, *, df=None, config=None, summary=None, targets=None) -> Path:
    """Write RUN_DIR/report.html (or ``out``) from the run's results; returns the path."""
    from .store import RunDirError, load_results
    from .summary import summarize

    root = Path(run_dir)
    store = RunStore(root)
    config = config or store.read_config()
    if config is None:
        raise RunDirError(f"{root} is not a fastfair audit directory (no audit.json)")
    if df is None:
        df = load_results(root)
    if not len(df):
        raise RunDirError(f"{root} has no finished images yet; run the audit (or --resume it) first")
    if summary is None or targets is not None:
        if targets is not None:
            from .runner import parse_targets
            from .attributes import AttributeSet

            sets = [AttributeSet(n, tuple(a["labels"]), tuple(a["words"]), tuple(tuple(p) for p in a["prompts"]),
                                 a["open_word"]) for n, a in config["settings"]["attributes"].items()]
            parsed = parse_targets(targets, sets)
            config = dict(config, summary=dict(config.get("summary", {}), targets=parsed), targets_override=parsed)
        summary = summarize(df, config)
    # other targets go to their own page unless --out says where: the run's report.html keeps the run's targets
    path = Path(out) if out else root / (REPORT if targets is None else "report-targets.html")
    if path.is_dir():
        raise RunDirError(f"--out {path} is a directory; give a file name, e.g. {path / 'report.html'}")
    if out is not None and (path.parent / "audit.json").is_file():  # inside a run folder: only its reports
        if path.suffix.lower() not in (".html", ".htm"):
            raise RunDirError(f"--out {path} is inside an audit run folder and is not an .html file: it would replace "
                              "the run's own data; give a report file name (.html)")
        if path.name == REPORT and path.parent.resolve() != root.resolve():
            raise RunDirError(f"--out {path} is another audit run's report; write this run's report elsewhere")
    page = build_html(root, df, config, summary)
    atomic_write(path, page.encode("utf-8"))
    return path
