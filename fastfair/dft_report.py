"""The DFT training report (``fastfair report RUN_DIR`` on a ``fastfair finetune dft`` folder): one self-contained
HTML page from ``dft.json`` -- the losses per step, each attribute's class frequencies in the training batches
against the target (and the share of images kept as alignment targets, the faces found), the evaluations
(target gap of the current and EMA weights over the steps, per-prompt frequencies at the first and last
evaluation), the settings and environment. Written at the end of every training run; inline SVG, no plotting
library.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ._io import atomic_write
from .alignment import marginals
from .audit.page import CSS, PALETTE, SCRIPT, E, _table

REPORT = "report.html"


def svg_lines(series: dict, title: str, *, hlines: dict | None = None, ymin: float | None = None,
              ymax: float | None = None) -> str:
    """Lines of (x, y) points, one per series name, with optional dashed horizontal reference lines."""
    pts = {k: [(float(x), float(y)) for x, y in v if y is not None and math.isfinite(float(y))]
           for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    if not pts:
        return "<p class=muted>no values</p>"
    xs = [x for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v] + list((hlines or {}).values())
    x0, x1 = min(xs), max(xs)
    y0 = min(ys) if ymin is None else ymin
    y1 = max(ys) if ymax is None else ymax
    if x1 == x0:
        x1 = x0 + 1
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    lw, pw, ph, top = 56, 560, 180, 26
    w, h = lw + pw + 150, top + ph + 34

    def X(x):
        return lw + (x - x0) / (x1 - x0) * pw

    def Y(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg class=plot xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'role="img" aria-label="{E(title)}">', f'<text x="{lw}" y="16" class=t>{E(title)}</text>']
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        out.append(f'<line x1="{lw}" y1="{Y(yv):.1f}" x2="{lw + pw}" y2="{Y(yv):.1f}" class=grid />'
                   f'<text x="{lw - 4}" y="{Y(yv) + 4:.1f}" class=ax text-anchor="end">{yv:.3g}</text>')
    step = max(1, math.ceil((x1 - x0) / 6))          # steps are integers: ticks on whole steps
    for xv in range(math.ceil(x0), math.floor(x1) + 1, step):
        out.append(f'<text x="{X(xv):.1f}" y="{top + ph + 16}" class=ax text-anchor="middle">{xv}</text>')
    out.append(f'<text x="{lw + pw / 2}" y="{h - 2}" class=ax text-anchor="middle">step</text>')
    for i, (name, v) in enumerate((hlines or {}).items()):
        out.append(f'<line x1="{lw}" y1="{Y(v):.1f}" x2="{lw + pw}" y2="{Y(v):.1f}" class=target '
                   f'style="stroke:{PALETTE[i % len(PALETTE)]}"><title>{E(name)}: {v:.3g}</title></line>')
    for i, (name, v) in enumerate(pts.items()):
        c = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in v)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{path}"><title>{E(name)}'
                   f'</title></polyline>')
        if len(v) <= 60:
            out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.2" fill="{c}"><title>{E(name)} at step {x:.0f}: '
                    f'{y:.4g}</title></circle>' for x, y in v]
        out.append(f'<rect x="{lw + pw + 12}" y="{top + 14 * i}" width="10" height="10" fill="{c}"/>'
                   f'<text x="{lw + pw + 26}" y="{top + 9 + 14 * i}" class=ax>{E(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _freq_cell(f):
    return "–" if f is None else (f"{100 * f:.0f}%", f)


def build_dft_html(meta: dict, name: str = "") -> str:
    cfg, hist, evals = meta.get("config", {}), meta.get("history", []), meta.get("evaluations", [])
    labels = meta.get("attributes", {})
    targets = _marginals(labels, meta.get("joint_target"))
    title = f"fastfair DFT report – {name}" if name else "fastfair DFT report"
    if meta.get("model"):
        title += f" ({meta['model']})"
    last_ev = evals[-1] if evals else None
    cards = [("steps", meta.get("steps", len(hist))), ("trainable", cfg.get("trainable")),
             ("images per step", cfg.get("images_per_prompt")), ("prompts", len(meta.get("prompts", [])))]
    if hist:
        cards.append(("last loss", f"{hist[-1]['loss']:.4f}"))
    if last_ev:
        for which in ("model", "ema"):
            for a, s in (last_ev.get(which) or {}).get("summary", {}).items():
                if s:
                    # the paper's metric: bias (mean pairwise |f_i - f_j|) for uniform targets (gender, race), the
                    # target gap for others (age 75/25); runs recorded before the bias have only the gap
                    uniform = all(abs(t - 1.0 / len(targets[a])) < 1e-9 for t in targets[a])
                    key, name = ("bias", "bias") if uniform and "bias" in s else ("target_gap", "target gap")
                    cards.append((f"{a} {name} ({which}, step {last_ev['step']})", f"{s[key]:.3f}"))
    parts = [f"<h1>{E(title)}</h1>",
             "<p class=muted>Adjusted direct finetuning with the distributional alignment loss (Shen et al., ICLR "
             f"2024). Classifier {E(str(meta.get('classifier')))}; targets "
             + "; ".join(f"{E(a)} " + " / ".join(f"{E(l)} {100 * t:.0f}%" for l, t in zip(labels[a], targets[a]))
                         for a in labels) + ".</p>",
             '<div class=cards>' + "".join(f"<div class=card>{E(k)}<b>{E(str(v))}</b></div>" for k, v in cards)
             + "</div>"]
    if not hist:
        parts.append("<p class=warn>No training step has finished yet.</p>")
    else:
        steps = [h["step"] for h in hist]
        series = {"loss": [(s, h["loss"]) for s, h in zip(steps, hist)],
                  "alignment": [(s, h.get("loss_align")) for s, h in zip(steps, hist)],
                  "quality": [(s, h.get("loss_quality")) for s, h in zip(steps, hist)]}
        if any("loss_face" in h for h in hist):
            series["face realism"] = [(s, h.get("loss_face")) for s, h in zip(steps, hist)]
        parts += ["<h2>Losses</h2>", svg_lines(series, "loss per step (its parts unweighted)")]
        skipped = sum(bool(h.get("skipped")) for h in hist)
        if skipped:
            parts.append(f"<p class=warn>{skipped} step(s) skipped on non-finite gradients.</p>")
        parts.append("<h2>Training batches</h2><p class=muted>Class frequencies of each step's images (argmax of "
                     "the classifier; with a face detector over the images with a face), against the target "
                     "(dashed); the share of images kept as alignment targets.</p>")
        for a, labs in labels.items():
            ser = {lab: [(s, (h["distribution"].get(a) or [None] * len(labs))[k]) for s, h in zip(steps, hist)]
                   for k, lab in enumerate(labs)}
            ser["kept"] = [(s, h.get("kept", {}).get(a)) for s, h in zip(steps, hist)]
            parts.append(svg_lines(ser, f"{a}: batch class frequencies", ymin=0, ymax=1,
                                   hlines={f"target {lab}": t for lab, t in zip(labs, targets[a])}))
        if any("faces" in h for h in hist):
            n = cfg.get("images_per_prompt") or 1
            parts.append(svg_lines({"faces found": [(s, h.get("faces", 0) / n) for s, h in zip(steps, hist)]},
                                   "share of the step's images with a face", ymin=0, ymax=1))
    if evals:
        parts.append("<h2>Evaluations</h2><p class=muted>Evaluation prompts at fixed seeds "
                     f"({E(str(cfg.get('eval_seeds')))} images each): per attribute the mean over prompts of the "
                     "target gap mean<sub>c</sub> |f<sub>c</sub> − t<sub>c</sub>| (0 = on target), for the "
                     "current and the EMA weights.</p>")
        for a in labels:
            ser = {}
            for which in ("model", "ema"):
                pts = [(e["step"], ((e.get(which) or {}).get("summary", {}).get(a) or {}).get("target_gap"))
                       for e in evals if which in e]
                if pts:
                    ser[f"{which} target gap"] = pts
            parts.append(svg_lines(ser, f"{a}: evaluation target gap", ymin=0))
        first = evals[0]
        for which in ("model", "ema"):
            if which not in last_ev:
                continue
            head = ["prompt"] + [f"{E(a)}: {E(lab)} (step {first['step']} → {last_ev['step']})"
                                 for a, labs in labels.items() for lab in labs]
            rows = []
            for p, per in last_ev[which]["per_prompt"].items():
                before = first["model"]["per_prompt"].get(p, {})
                cells = [E(p)]
                for a, labs in labels.items():
                    for k in range(len(labs)):
                        f0 = (before.get(a) or [None] * len(labs))[k]
                        f1 = (per.get(a) or [None] * len(labs))[k]
                        cells.append((f"{'–' if f0 is None else f'{100 * f0:.0f}%'} → "
                                      f"{'–' if f1 is None else f'{100 * f1:.0f}%'}", f1 if f1 is not None else -1))
                rows.append(cells)
            parts.append(f"<h3>per prompt ({'EMA' if which == 'ema' else 'current'} weights)</h3>"
                         + _table(head, rows))
    parts.append("<h2>Outputs</h2>" + _table(["output", "path"], [[E(k), E(v)] for k, v in
                                                                   meta.get("outputs", {}).items()], cls=""))
    parts.append("<h2>Settings</h2><pre>" + E(json.dumps({k: v for k, v in meta.items()
                                                        if k not in ("history", "evaluations")}, indent=2)) + "</pre>")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
            f"<title>{E(title)}</title><style>{CSS}</style></head><body><div id=js-errors></div>"
            + "\n".join(parts) + f"<script>{SCRIPT}</script></body></html>")


def _marginals(labels: dict, joint) -> dict:
    """Per attribute the joint target's marginal (row-major joint classes); uniform without a joint target."""
    sizes = [len(v) for v in labels.values()]
    if not joint:
        return {a: [1.0 / n] * n for a, n in zip(labels, sizes)}
    return {a: m.tolist() for a, m in zip(labels, marginals(joint, sizes))}


def write_dft_report(run_dir, out=None) -> Path:
    """Write RUN_DIR/report.html (or ``out``) from RUN_DIR/dft.json; returns the path."""
    root = Path(run_dir)
    meta_path = root / "dft.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root} is not a fastfair DFT folder (no dft.json; it is written when training ends)")
    meta = json.loads(meta_path.read_text())
    path = Path(out) if out else root / REPORT
    atomic_write(path, build_dft_html(meta, root.name).encode("utf-8"))
    return path
