"""Summaries of an audit's rows: mIoU with bootstrap CIs, distribution metrics, prompt adherence.

Every interval is a stratified percentile bootstrap (``fastfair.distribution.bootstrap_ci``):
images are resampled within their profession, ``n_boot`` times, from a fixed seed. An estimate outside its own
interval (small samples of the |.|- and log-based metrics) is marked ``"outside": true``. Overall values
are macro averages over professions (each profession counts once, as in BiasMap's mIoU and DFT's
bias averaged over prompts).
"""
from __future__ import annotations

import numpy as np

from .. import distribution as D
from .attributes import intersection_labels, slug
from .prompts import fill


def _ci(t) -> dict:
    """{mean, lo, hi}; ``outside``: the estimate lies outside its percentile interval -- metrics built on |.| or
    logs (DFT bias, KL, gaps) are biased upward in small samples, so their resamples can sit above the estimate."""
    m, lo, hi = t
    out = {"mean": _f(m), "lo": _f(lo), "hi": _f(hi)}
    if None not in out.values() and not out["lo"] - 1e-12 <= out["mean"] <= out["hi"] + 1e-12:
        out["outside"] = True
    return out


def _f(x):
    x = float(x)
    return None if not np.isfinite(x) else x


def _groups(df, professions, col):
    """Per profession (in order), the finite values of ``col``."""
    by = {p: g for p, g in df.groupby("profession", sort=False)[col]} if len(df) else {}
    out = []
    for p in professions:
        v = by[p].to_numpy(dtype=np.float64) if p in by else np.zeros(0)
        out.append(v[np.isfinite(v)])
    return out


def _entanglement_block(df, professions, col, n_boot, seed, level) -> dict:
    """Mean per profession and macro mean, with intervals from one set of resamples per profession
    (drawn in order from one generator, as ``distribution.bootstrap_ci`` does)."""
    groups = _groups(df, professions, col)
    rng = np.random.default_rng(seed)
    boots = [g[rng.integers(0, g.size, size=(n_boot, g.size))].mean(1) if g.size else np.full(n_boot, np.nan)
             for g in groups]
    per = {}
    for p, g, b in zip(professions, groups, boots):
        per[p] = dict(_ci((g.mean() if g.size else np.nan, *_interval(b, level))), n=int(g.size))
    with D._quiet_nanmean():
        point = np.nanmean([g.mean() for g in groups if g.size]) if any(g.size for g in groups) else np.nan
        dist = np.nanmean(np.stack(boots), axis=0) if boots else np.full(n_boot, np.nan)
    overall = _ci((point, *_interval(dist, level)))
    overall["n"] = int(sum(g.size for g in groups))
    return {"overall": overall, "per_profession": per}


def _metrics_for(K: int, target: list[float]):
    t = np.asarray(target, dtype=np.float64)
    out = {"dft_bias": D.dft_bias, "kl_uniform": D.kl_to_uniform, "target_gap": lambda f: D.target_gap(f, t)}
    if K == 2:
        out["delta"] = D.delta
        out["risk_difference"] = lambda f: D.risk_difference(f, 0, 1)
    return out


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if not v.size:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _safe(metric, f: np.ndarray) -> np.ndarray:
    """``metric`` over rows of frequencies; NaN where a row is undefined (no classified image)."""
    out = np.full(f.shape[:-1], np.nan)
    ok = np.isfinite(f).all(-1)
    if ok.any():
        out[ok] = metric(f[ok])
    return out


def _distribution_block(df, professions, col, labels, target, n_boot, seed, level) -> dict:
    """Frequencies and metrics per profession and overall. The resamples are drawn once per profession
    (one generator, professions in order, as ``distribution.bootstrap_ci`` draws them) and shared by all
    metrics; the overall interval is that of the macro mean over professions."""
    K = len(labels)
    metrics = _metrics_for(K, target)
    by = {p: g for p, g in df.groupby("profession", sort=False)[col]} if len(df) else {}
    codes = [D.encode(by[p].tolist(), labels) if p in by else np.zeros(0, dtype=np.int64) for p in professions]
    rng = np.random.default_rng(seed)
    point_f, boot_f = [], []
    for c in codes:
        point_f.append(D.frequencies(c, K))
        if c.size:
            boot_f.append(D.frequencies(c[rng.integers(0, c.size, size=(n_boot, c.size))], K))
        else:
            boot_f.append(np.full((n_boot, K), np.nan))
    per = {}
    vals = {name: ([_safe(fn, f[None])[0] for f in point_f], [_safe(fn, b) for b in boot_f])
            for name, fn in metrics.items()}
    for i, (p, c) in enumerate(zip(professions, codes)):
        entry = {"n": int((c >= 0).sum()), "abstained": int((c < 0).sum()), "freq": [_f(x) for x in point_f[i]]}
        for name in metrics:
            entry[name] = _ci((vals[name][0][i], *_interval(vals[name][1][i], level)))
        per[p] = entry
    allc = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
    pooled = D.frequencies(allc, K)
    overall = {"n": int((allc >= 0).sum()), "abstained": int((allc < 0).sum()),
               "freq_pooled": [_f(x) for x in pooled],
               # the metrics of the pooled frequencies (all professions' images together): not the macro means
               "pooled": {name: _f(_safe(fn, pooled[None])[0]) for name, fn in metrics.items()}}
    with np.errstate(invalid="ignore"), D._quiet_nanmean():
        for name in metrics:
            point = np.nanmean(np.asarray(vals[name][0], dtype=np.float64)) if codes else np.nan
            dist = np.nanmean(np.stack(vals[name][1]), axis=0) if codes else np.full(n_boot, np.nan)
            overall[name] = _ci((point, *_interval(dist, level)))
    return {"labels": list(labels), "target": [float(x) for x in target], "overall": overall, "per_profession": per}


def planned_images(config: dict) -> int:
    """Images an audit's plan holds: per profession and seed, the neutral image and (in-prompt entanglement) one
    per class word."""
    st = config["settings"]
    per_prompt = 1 + (sum(len(a["labels"]) for a in st["attributes"].values()) if "inprompt" in st["entanglement"]
                      else 0)
    return len(config["work"]["professions"]) * len(config["work"]["seeds"]) * per_prompt


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
    out: dict = {"n_images": int(len(df)), "n_planned": planned_images(config),
                 "professions": professions, "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level}}
    if not len(df):
        return out
    neutral = df[df["kind"] == "neutral"]
    inprompt = df[df["kind"] == "inprompt"]
    out["n_neutral"], out["n_inprompt"] = int(len(neutral)), int(len(inprompt))
    if "safety_blocked" in df.columns:  # blacked out by the pipeline's safety checker: abstentions of the classifier
        out["safety_blocked"] = int(df["safety_blocked"].fillna(False).astype(bool).sum())

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
                # the prompt actually read (soft tokens' prefix included, as runner.attribution_prompt builds it)
                "attribution_example": (f"{st['prompt_prefix']} " if st.get("prompt_prefix") else "")
                + fill(st["attribution_template"], professions[0], attribute=w,
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
                block["per_label"][lab] = _entanglement_block(r, professions, "iou_inprompt", n_boot, seed,
                                                              level)["overall"]
            ent["inprompt"][name] = block
    out["entanglement"] = ent
    if st.get("clip_score") and "clip_score" in df.columns:   # prompt alignment of the neutral images
        out["clip_score"] = _entanglement_block(neutral, professions, "clip_score", n_boot, seed, level)

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
                                           for lab in attrs[name]["labels"]},
                             "per_label_n": {lab: int((rows.loc[ok, "label"] == lab).sum())
                                             for lab in attrs[name]["labels"]}}
            out["adherence"] = adh
        if "edit_target" in neutral.columns and neutral["edit_target"].notna().any():
            # Fair Diffusion: how often the classifier sees the group each neutral image was steered to, for
            # every attribute set (or intersection) whose labels name the groups; a joint Fair Diffusion's
            # "female|White" targets are also read part by part against each attribute set
            steer = {}
            tgt = neutral["edit_target"]
            n_parts = len(str(tgt.dropna().iloc[0]).split("|"))
            comps = [tgt.map(lambda t, j=j: None if t is None else str(t).split("|")[j]) for j in range(n_parts)]

            def share(pred, want, labels):
                ok = pred.notna() & want.notna()
                if not ok.any():
                    return None
                hit = pred[ok] == want[ok]
                return {"overall": _f(hit.mean()), "n": int(ok.sum()),
                        "per_target": {lab: _f(hit[want[ok] == lab].mean()) for lab in labels
                                       if (want[ok] == lab).any()},
                        "per_target_n": {lab: int((want[ok] == lab).sum()) for lab in labels
                                         if (want[ok] == lab).any()}}

            part_of = {}  # attribute set -> the joint target's component that names its groups
            for name, a in attrs.items():
                for j, want in enumerate([tgt] if n_parts == 1 else comps):
                    if set(want.dropna()) <= set(a["labels"]):
                        part_of[name] = j
                        blk = share(neutral[f"pred_{slug(name)}"], want, a["labels"])
                        if blk is not None:
                            steer[name] = blk
                        break
            if n_parts > 1:
                for iname in st.get("intersections", []):
                    parts = iname.split("×")
                    col = f"pred_{slug(iname)}"
                    if col not in neutral.columns or not all(p in part_of for p in parts):
                        continue
                    # the target's components in the intersection's order ("White|female" -> "female|White")
                    want = comps[part_of[parts[0]]]
                    for p in parts[1:]:
                        want = want + "|" + comps[part_of[p]]
                    labels = intersection_labels([_Labels(attrs[p]["labels"]) for p in parts])
                    blk = share(neutral[col], want, labels)
                    if blk is not None:
                        steer[iname] = blk
            out["steering"] = steer
    return out


class _Labels:
    def __init__(self, labels):
        self.labels = tuple(labels)
