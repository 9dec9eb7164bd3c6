"""Summaries of an audit's rows: mIoU with bootstrap CIs, distribution metrics, prompt adherence.

Every interval is a stratified percentile bootstrap (``fastfair.distribution.bootstrap_ci``):
images are resampled within their profession, ``n_boot`` times, from a fixed seed. Overall values
are macro averages over professions (each profession counts once, as in BiasMap's mIoU and DFT's
bias averaged over prompts).
"""
from __future__ import annotations

import numpy as np

from .. import distribution as D
from .attributes import intersection_labels, slug
from .prompts import fill


def _ci(t) -> dict:
    m, lo, hi = t
    return {"mean": _f(m), "lo": _f(lo), "hi": _f(hi)}


def _f(x):
    x = float(x)
    return None if not np.isfinite(x) else x


def _groups(df, professions, col):
    out = []
    for p in professions:
        v = df.loc[df["profession"] == p, col].to_numpy(dtype=np.float64)
        out.append(v[np.isfinite(v)])
    return out


def _entanglement_block(df, professions, col, n_boot, seed, level) -> dict:
    groups = _groups(df, professions, col)
    per = {}
    for p, g in zip(professions, groups):
        per[p] = dict(_ci(D.bootstrap_ci([g], D.mean_statistic, n_boot=n_boot, seed=seed, level=level)), n=int(g.size))
    overall = _ci(D.bootstrap_ci(groups, D.mean_statistic, n_boot=n_boot, seed=seed, level=level))
    overall["n"] = int(sum(g.size for g in groups))
    return {"overall": overall, "per_profession": per}


def _metrics_for(K: int, target: list[float]):
    t = np.asarray(target, dtype=np.float64)
    out = {"dft_bias": D.dft_bias, "kl_uniform": D.kl_to_uniform, "target_gap": lambda f: D.target_gap(f, t)}
    if K == 2:
        out["delta"] = D.delta
        out["risk_difference"] = lambda f: D.risk_difference(f, 0, 1)
    return out


def _distribution_block(df, professions, col, labels, target, n_boot, seed, level) -> dict:
    K = len(labels)
    metrics = _metrics_for(K, target)
    codes = []
    for p in professions:
        codes.append(D.encode(df.loc[df["profession"] == p, col].tolist(), labels))
    per = {}
    for p, c in zip(professions, codes):
        f = D.frequencies(c, K)
        entry = {"n": int((c >= 0).sum()), "abstained": int((c < 0).sum()), "freq": [_f(x) for x in f]}
        for name, fn in metrics.items():
            entry[name] = _ci(D.bootstrap_ci([c], D.frequency_statistic(K, fn), n_boot=n_boot, seed=seed, level=level))
        per[p] = entry
    allc = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
    overall = {"n": int((allc >= 0).sum()), "abstained": int((allc < 0).sum()),
               "freq_pooled": [_f(x) for x in D.frequencies(allc, K)]}
    for name, fn in metrics.items():
        overall[name] = _ci(D.bootstrap_ci(codes, D.frequency_statistic(K, fn), n_boot=n_boot, seed=seed, level=level))
    return {"labels": list(labels), "target": [float(x) for x in target], "overall": overall, "per_profession": per}


def summarize(df, config: dict, targets: dict | None = None, n_boot: int | None = None, seed: int | None = None,
              level: float | None = None) -> dict:
    """The summary of an audit's rows (``results.parquet`` as a DataFrame) under its config."""
    st = config["settings"]
    opts = config.get("summary", {})
    targets = targets or opts.get("targets", {})
    n_boot = n_boot or opts.get("n_boot", 1000)
    seed = opts.get("boot_seed", 0) if seed is None else seed
    level = level or opts.get("level", 0.95)
    professions = list(config["work"]["professions"])
    attrs = st["attributes"]
    per_prompt = 1 + (sum(len(a["labels"]) for a in attrs.values()) if "inprompt" in st["entanglement"] else 0)
    out: dict = {"n_images": int(len(df)), "n_planned": len(professions) * len(config["work"]["seeds"]) * per_prompt,
                 "professions": professions, "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level}}
    if not len(df):
        return out
    neutral = df[df["kind"] == "neutral"]
    inprompt = df[df["kind"] == "inprompt"]
    out["n_neutral"], out["n_inprompt"] = int(len(neutral)), int(len(inprompt))

    ent: dict = {}
    if "open" in st["entanglement"]:
        words = []
        for name, a in attrs.items():
            if a["open_word"] not in words:
                words.append(a["open_word"])
        ent["open"] = {}
        for w in words:
            ent["open"][w] = {
                "sets": [n for n, a in attrs.items() if a["open_word"] == w],
                "attribution_example": fill(st["attribution_template"], professions[0], attribute=w,
                                            prompt=fill(st["template"], professions[0])),
                "iou": _entanglement_block(neutral, professions, f"iou_open_{slug(w)}", n_boot, seed, level),
                "soft_iou": _entanglement_block(neutral, professions, f"softiou_open_{slug(w)}", n_boot, seed, level),
            }
    if "inprompt" in st["entanglement"]:
        ent["inprompt"] = {}
        for name, a in attrs.items():
            rows = inprompt[inprompt["attribute"] == name]
            block = {"iou": _entanglement_block(rows, professions, "iou_inprompt", n_boot, seed, level),
                     "soft_iou": _entanglement_block(rows, professions, "softiou_inprompt", n_boot, seed, level),
                     "per_label": {}}
            for lab in a["labels"]:
                r = rows[rows["label"] == lab]
                block["per_label"][lab] = _ci(D.bootstrap_ci(_groups(r, professions, "iou_inprompt"), D.mean_statistic,
                                                             n_boot=n_boot, seed=seed, level=level))
            ent["inprompt"][name] = block
    out["entanglement"] = ent

    if st.get("classifier"):
        dist: dict = {}
        for name, a in attrs.items():
            t = targets.get(name) or [1.0 / len(a["labels"])] * len(a["labels"])
            dist[name] = _distribution_block(neutral, professions, f"pred_{slug(name)}", a["labels"], t,
                                             n_boot, seed, level)
        for iname in st.get("intersections", []):
            parts = iname.split("×")
            labels = intersection_labels([_Labels(attrs[p]["labels"]) for p in parts])
            t = np.array([1.0])
            for p in parts:
                tp = targets.get(p) or [1.0 / len(attrs[p]["labels"])] * len(attrs[p]["labels"])
                t = np.outer(t, np.asarray(tp)).ravel()
            block = _distribution_block(neutral, professions, f"pred_{slug(iname)}", labels, t.tolist(),
                                        n_boot, seed, level)
            block["parts"] = parts
            dist[iname] = block
        out["distribution"] = dist
        if len(inprompt):
            adh = {}
            for name in attrs:
                rows = inprompt[inprompt["attribute"] == name]
                pred = rows[f"pred_{slug(name)}"]
                ok = pred.notna()
                if not ok.any():
                    continue
                hit = (pred[ok] == rows.loc[ok, "label"])
                adh[name] = {"overall": _f(hit.mean()), "n": int(ok.sum()),
                             "per_label": {lab: _f(hit[rows.loc[ok, "label"] == lab].mean())
                                           for lab in attrs[name]["labels"]}}
            out["adherence"] = adh
    return out


class _Labels:
    def __init__(self, labels):
        self.labels = tuple(labels)
