"""Compare audit runs: a baseline against other models or mitigations (Fair Diffusion, entanglement guidance, a
MIST edit, a DFT LoRA, ...), image by image.

Two runs of the same plan hold the same images up to the change under test: neutral image (profession, seed)
and in-prompt image (profession, seed, attribute set, class) exist in both. Every metric is compared on the
pairs present in both, and its difference (other - baseline) gets a paired, profession-stratified percentile
bootstrap interval: within each profession the *pairs* are resampled (the same indices for both runs), the
statistic is computed on both resampled runs, and the overall value is the macro mean over professions, as in
the audit's own summary. Pairing removes the seed-to-seed variation both runs share, so a mitigation's effect
gets a much tighter interval than two independent intervals would suggest.

Compared: open-vocabulary entanglement (IoU, SoftIoU per attribute word), in-prompt entanglement per attribute
set, and the output distribution per attribute set and intersection (DFT bias, KL to uniform, target gap
against the baseline's targets, and for two classes Delta and risk difference; on the images both runs
classified). Not compared: per-label in-prompt IoU, prompt adherence, Fair Diffusion steering (see each run's
report). Runs must have been measured alike -- same prompt template and attribute sets; for entanglement the
same map aggregation and IoU / SoftIoU settings; for distributions the same classifier on each shared set --
or the comparison is refused; the settings that differ (the model, generation settings, mitigations) are
listed, and ``coverage`` says how many images both runs hold (a partial run, or other seeds, is compared on
the overlap and flagged).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import distribution as D
from .attributes import intersection_labels, slug
from .store import RunDirError, RunStore, load_results
from .summary import _ci as _triple, _f, _interval, _Labels, _metrics_for, _safe, planned_images

__all__ = ["compare", "CompareError", "format_markdown"]


class CompareError(ValueError):
    """Runs that cannot be compared (different measurement, nothing in common)."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("generation", "metrics"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _Run:
    def __init__(self, path):
        self.root = Path(path)
        cfg = RunStore(self.root).read_config() if (self.root / "audit.json").exists() else None
        if cfg is None:
            raise RunDirError(f"{self.root} is not a fastfair audit directory (no audit.json)")
        self.config, self.settings = cfg, cfg["settings"]
        df = load_results(self.root)
        if not len(df):
            raise RunDirError(f"{self.root} has no finished images yet; run the audit (or --resume it) first")
        self.df = df
        self.targets = cfg.get("summary", {}).get("targets", {}) or {}

    def name(self) -> str:
        return self.settings.get("model", str(self.root))


def _check_alike(a: _Run, b: _Run) -> list[str]:
    """Raise unless a and b were measured alike; returns the settings that differ."""
    sa, sb = a.settings, b.settings
    must = {"template": (sa["template"], sb["template"])}
    if set(sa["entanglement"]) & set(sb["entanglement"]):  # maps compared: measured alike
        must.update(metrics=(sa["metrics"], sb["metrics"]),
                    aggregation=(sa["generation"].get("aggregation"), sb["generation"].get("aggregation")))
    for n in set(sa["attributes"]) & set(sb["attributes"]):
        must[f"attributes.{n}"] = (sa["attributes"][n], sb["attributes"][n])
    if "open" in sa["entanglement"] and "open" in sb["entanglement"]:
        must["attribution_template"] = (sa["attribution_template"], sb["attribution_template"])
    if "inprompt" in sa["entanglement"] and "inprompt" in sb["entanglement"]:
        must["inprompt_template"] = (sa["inprompt_template"], sb["inprompt_template"])
    bad = sorted(k for k, (x, y) in must.items() if x != y)
    if bad:
        raise CompareError(f"{a.root} and {b.root} were measured differently ({', '.join(bad)}); their numbers "
                           "are not comparable -- audit both with the same measurement settings")
    fa, fb = _flat(sa), _flat(sb)
    differs = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    if a.targets != b.targets:  # the target gap is computed against the baseline's targets
        differs.append("summary.targets")
    return differs


def _classifier_for(desc: dict | None, name: str):
    """The part of a classifier's description that concerns attribute set ``name`` (descriptions hold per-set
    prompts / labels for every set the audit asked for; two runs with other set lists share a classifier)."""
    if not desc:
        return None
    return {k: (v.get(name) if isinstance(v, dict) else v) for k, v in desc.items()}


def _pairs(a, b, keys, col):
    """(professions in a's order, per profession: (values a, values b)) over keys present in both."""
    m = a[keys + [col]].merge(b[keys + [col]], on=keys, suffixes=("_a", "_b"))
    profs = list(dict.fromkeys(a["profession"]))
    out = {}
    for p, g in m.groupby("profession", sort=False):
        g = g.sort_values(keys)
        out[p] = (g[f"{col}_a"].to_numpy(), g[f"{col}_b"].to_numpy())
    return [p for p in profs if p in out], out


def _ci(point, boots, level) -> dict:
    return _triple((point, *_interval(boots, level)))


def _mean_block(a, b, keys, col, n_boot, seed, level) -> dict | None:
    profs, data = _pairs(a, b, keys, col)
    rng = np.random.default_rng(seed)
    pa, pb, pd_, boots = [], [], [], []
    n = 0
    for p in profs:
        va, vb = (x.astype(np.float64) for x in data[p])
        ok = np.isfinite(va) & np.isfinite(vb)  # an undefined IoU (empty mask) in either run drops the pair
        va, vb = va[ok], vb[ok]
        if not va.size:
            continue
        n += va.size
        d = vb - va
        pa.append(va.mean()), pb.append(vb.mean()), pd_.append(d.mean())
        boots.append(d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1))
    if not n:
        return None
    boot = np.mean(np.stack(boots), axis=0)
    return {"baseline": float(np.mean(pa)), "other": float(np.mean(pb)), "diff": _ci(np.mean(pd_), boot, level),
            "n_pairs": int(n), "professions": len(pd_)}


def _distribution_blocks(a, b, col, labels, target, n_boot, seed, level) -> dict:
    K = len(labels)
    metrics = _metrics_for(K, target)
    profs, data = _pairs(a, b, ["profession", "seed"], col)
    rng = np.random.default_rng(seed)
    vals = {name: ([], [], [], []) for name in metrics}  # base points, other points, diff points, diff boots
    n = 0
    for p in profs:
        ca, cb = D.encode(list(data[p][0]), labels), D.encode(list(data[p][1]), labels)
        both = (ca >= 0) & (cb >= 0)  # an abstention in either run drops the pair (baseline, run and
        ca, cb = ca[both], cb[both]   # difference then cover the same images)
        if not ca.size:
            continue
        n += ca.size
        idx = rng.integers(0, ca.size, size=(n_boot, ca.size))
        fa, fb = D.frequencies(ca, K)[None], D.frequencies(cb, K)[None]
        ba, bb = D.frequencies(ca[idx], K), D.frequencies(cb[idx], K)
        for name, fn in metrics.items():
            xa, xb = _safe(fn, fa)[0], _safe(fn, fb)[0]
            if not (np.isfinite(xa) and np.isfinite(xb)):
                continue
            v = vals[name]
            v[0].append(xa), v[1].append(xb), v[2].append(xb - xa), v[3].append(_safe(fn, bb) - _safe(fn, ba))
    out = {}
    if not n:
        return out
    with np.errstate(invalid="ignore"), D._quiet_nanmean():
        for name, (xa, xb, d, boots) in vals.items():
            if not d:
                continue
            boot = np.nanmean(np.stack(boots), axis=0)
            out[name] = {"baseline": _f(np.nanmean(xa)), "other": _f(np.nanmean(xb)),
                         "diff": _ci(np.nanmean(d), boot, level), "n_pairs": int(n), "professions": len(d)}
    return out


def _env_diff(a: _Run, b: _Run) -> dict:
    """{key: [baseline's values, run's values]} for the recorded environment fields (library versions, device,
    git revision) that differ; runs made before environments were recorded compare as unknown."""
    ea, eb = a.config.get("environments") or [], b.config.get("environments") or []
    if not ea or not eb:
        return {"recorded": [[str(bool(ea))], [str(bool(eb))]]} if ea or eb else {}
    out = {}
    for k in sorted({k for e in ea + eb for k in e}):
        va = sorted({str(e[k]) for e in ea if k in e})
        vb = sorted({str(e[k]) for e in eb if k in e})
        if va and vb and va != vb:  # a field one run never recorded (an older fastfair) is unknown, not different
            out[k] = [va, vb]
    return out


def compare(baseline, *others, n_boot: int = 1000, seed: int = 0, level: float = 0.95, image_similarity=None,
            device=None) -> dict:
    """Compare audit run directories ``others`` against ``baseline``, image by image (see the module doc).

    Returns {"baseline": run, "comparisons": [{"run", "differs", "entanglement", "distribution"}, ...]}, every
    metric as {"baseline", "other", "diff": {"mean", "lo", "hi"}, "n_pairs", "professions"}.
    ``image_similarity``: encoders (``fastfair.features.load_encoders`` specs: "clip", "dinov2", "clip+dinov2", a
    module...) -- each comparison then also holds, per encoder, the cosine similarity of every neutral image to
    the baseline's image of the same profession and seed (how much the change alters the pictures), macro mean
    over professions with a profession-stratified bootstrap interval.
    """
    if not others:
        raise CompareError("give at least one run to compare against the baseline")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, float, np.integer)) or int(n_boot) != n_boot \
            or n_boot < 1:
        raise CompareError(f"n_boot must be a whole number >= 1; got {n_boot!r}")
    n_boot = int(n_boot)
    if not 0 < level < 1:
        raise CompareError(f"level must be in (0, 1); got {level}")
    encoders = []
    if image_similarity is not None:
        from ..features import FeatureError, load_encoders

        try:
            encoders = load_encoders(image_similarity, device)
        except FeatureError as e:
            raise CompareError(str(e)) from None
    base = _Run(baseline)
    out = {"baseline": {"run": str(base.root), "model": base.name()},
           "bootstrap": {"n_boot": int(n_boot), "seed": seed, "level": level, "paired": True}, "comparisons": []}
    for o in others:
        run = _Run(o)
        differs = _check_alike(base, run)
        A, B = base.df, run.df
        na, nb = A[A["kind"] == "neutral"], B[B["kind"] == "neutral"]
        ent: dict = {}
        if "open" in base.settings["entanglement"] and "open" in run.settings["entanglement"]:
            other_words = {a["open_word"] for a in run.settings["attributes"].values()}
            words = [a["open_word"] for a in base.settings["attributes"].values() if a["open_word"] in other_words]
            for w in dict.fromkeys(words):
                for kind in ("iou", "softiou"):
                    col = f"{kind}_open_{slug(w)}"
                    if col in na.columns and col in nb.columns:
                        blk = _mean_block(na, nb, ["profession", "seed"], col, n_boot, seed, level)
                        if blk is not None:
                            ent[f"{'IoU' if kind == 'iou' else 'SoftIoU'}(profession, {w}), open"] = blk
        if "inprompt" in base.settings["entanglement"] and "inprompt" in run.settings["entanglement"]:
            ia, ib = A[A["kind"] == "inprompt"], B[B["kind"] == "inprompt"]
            for name in base.settings["attributes"]:
                if name not in run.settings["attributes"]:
                    continue
                ra, rb = ia[ia["attribute"] == name], ib[ib["attribute"] == name]
                for kind in ("iou", "softiou"):
                    blk = _mean_block(ra, rb, ["profession", "seed", "label"], f"{kind}_inprompt", n_boot, seed,
                                      level)
                    if blk is not None:
                        ent[f"{'IoU' if kind == 'iou' else 'SoftIoU'}(profession, {name} word), in-prompt"] = blk
        dist: dict = {}
        ca, cb = base.settings.get("classifier"), run.settings.get("classifier")
        if ca and cb:
            attrs = base.settings["attributes"]
            shared = [n for n in attrs if n in run.settings["attributes"]]
            other_clf = [n for n in shared if _classifier_for(ca, n) != _classifier_for(cb, n)]
            if other_clf:
                raise CompareError(f"{base.root} and {run.root} classified {other_clf} with different classifiers; "
                                   "their distributions are not comparable (audit both with the same --classifier)")
            wa, wb = base.settings.get("classifier_weights"), run.settings.get("classifier_weights")
            if wa and wb and wa != wb and shared:
                raise CompareError(f"{base.root} and {run.root} classified with a classifier of the same name but "
                                   f"different weights ({wa} vs {wb}); their distributions are not comparable "
                                   "(audit both with the same classifier)")

            def target_of(n):
                return base.targets.get(n) or [1.0 / len(attrs[n]["labels"])] * len(attrs[n]["labels"])

            for name in shared:
                blk = _distribution_blocks(na, nb, f"pred_{slug(name)}", list(attrs[name]["labels"]), target_of(name),
                                           n_boot, seed, level)
                if blk:
                    dist[name] = blk
            for iname in base.settings.get("intersections", []):  # as the audit's summary: joint labels, and
                parts = iname.split("×")                          # the product of the parts' targets
                if iname not in run.settings.get("intersections", []) or not all(p in shared for p in parts):
                    continue
                labels = intersection_labels([_Labels(attrs[p]["labels"]) for p in parts])
                t = np.array([1.0])
                for p in parts:
                    t = np.outer(t, np.asarray(target_of(p))).ravel()
                blk = _distribution_blocks(na, nb, f"pred_{slug(iname)}", list(labels), t.tolist(), n_boot, seed,
                                           level)
                if blk:
                    dist[iname] = blk
        quality: dict = {}
        notes: list[str] = []
        for r, who in ((base, "the baseline"), (run, "this run")):
            planned = planned_images(r.config)
            if len(r.df) < planned:  # in-prompt rows can be missing while every neutral pair is there
                notes.append(f"{who} ({r.root}) is unfinished: {len(r.df)} of {planned} planned images; metrics over "
                             "missing professions or in-prompt images cover part of the plan (resume it first)")
        sa, sb = base.settings.get("clip_score"), run.settings.get("clip_score")
        if sa and sa == sb and "clip_score" in na.columns and "clip_score" in nb.columns:
            blk = _mean_block(na, nb, ["profession", "seed"], "clip_score", n_boot, seed, level)
            if blk is not None:
                quality["CLIP score (prompt alignment), neutral"] = blk
        elif sa or sb:
            notes.append("CLIP score not compared: " + (
                f"scored with {sa.get('model')} vs {sb.get('model')}" if sa and sb else
                f"only the {'baseline' if sa else 'run'} has CLIP scores (audit both with --clip-score)"))
        if not ent and not dist and not quality and not encoders:
            raise CompareError(f"{base.root} and {run.root} have no metric on common images (same professions and "
                               "seeds, a shared attribute set and entanglement mode or classifier)")
        keys = ["profession", "seed"]
        common = na[keys].merge(nb[keys], on=keys)
        pa, pb = set(na["profession"]), set(nb["profession"])
        sa, sb = set(na["seed"].tolist()), set(nb["seed"].tolist())
        coverage = {"neutral_pairs": int(len(common)), "baseline_neutral": int(len(na)), "run_neutral": int(len(nb)),
                    "professions": int(len(pa & pb)), "baseline_professions": int(len(pa)),
                    "professions_left_out": sorted(pa ^ pb), "seeds_left_out": sorted(sa ^ sb)}
        comp = {"run": str(run.root), "model": run.name(), "differs": differs,
                "environment_differs": _env_diff(base, run),
                "coverage": coverage, "entanglement": ent, "distribution": dist, "quality": quality,
                "notes": notes}
        if encoders:
            comp["image_similarity"] = _image_similarity(base, run, na, nb, encoders, n_boot, seed, level, device)
        out["comparisons"].append(comp)
    return out


def _image_similarity(base: _Run, run: _Run, na, nb, encoders, n_boot, seed, level, device, batch: int = 16) -> dict:
    """Per encoder: cosine similarity of each neutral image to the baseline's image of the same (profession,
    seed); per profession the mean, overall the macro mean with a profession-stratified bootstrap interval."""
    import torch
    from PIL import Image

    from ..classify import to_tensor
    from ..features import encoder_name

    keys = ["profession", "seed"]
    m = na[keys + ["image"]].merge(nb[keys + ["image"]], on=keys, suffixes=("_a", "_b"))
    if not len(m):
        return {}

    def load(root, rels):
        return to_tensor([Image.open(root / r) for r in rels])

    out = {}
    for enc in encoders:
        if device is not None and isinstance(enc, torch.nn.Module):
            enc.to(device)
        dev = device or next((p.device for p in getattr(enc, "parameters", lambda: iter(()))()), "cpu")
        name = encoder_name(enc)
        k = 2
        while name in out:   # the same encoder twice (or two of one class): keep both
            name = f"{encoder_name(enc)}#{k}"
            k += 1
        sims = []
        with torch.no_grad():
            for i in range(0, len(m), batch):
                part = m.iloc[i:i + batch]
                xa, xb = load(base.root, part["image_a"]), load(run.root, part["image_b"])
                fa = enc(xa.to(dev)).float().flatten(1)
                fb = enc(xb.to(dev)).float().flatten(1)
                if fa.shape != fb.shape:
                    raise CompareError(f"{name} gives {fa.shape[1]} features for the baseline's "
                                       f"{xa.shape[-1]}x{xa.shape[-2]} images but {fb.shape[1]} for the run's "
                                       f"{xb.shape[-1]}x{xb.shape[-2]} ones; use an encoder that resizes (clip, dinov2)")
                sims.append(torch.nn.functional.cosine_similarity(fa, fb, dim=1).cpu().numpy())
        sim = np.concatenate(sims).astype(np.float64)
        rng = np.random.default_rng(seed)
        per, boots = {}, []
        for p in list(dict.fromkeys(m["profession"])):
            v = sim[(m["profession"] == p).to_numpy()]
            per[p] = float(v.mean())
            boots.append(v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1))
        point = float(np.mean(list(per.values())))
        out[name] = {**_ci(point, np.mean(np.stack(boots), axis=0), level), "n_pairs": int(len(sim)),
                                  "professions": len(per), "per_profession": per}
    return out


def format_markdown(result: dict) -> str:
    """Tables of ``compare``'s result, one per compared run."""
    lv = int(round(100 * result["bootstrap"]["level"]))

    def num(x):
        return "n/a" if x is None else f"{x:.4f}"

    lines = []
    for c in result["comparisons"]:
        lines.append(f"## {c['run']} vs baseline {result['baseline']['run']}")
        if c["differs"]:
            lines.append("settings that differ: " + ", ".join(c["differs"]))
        if c.get("environment_differs"):
            lines.append("environment differs: " + "; ".join(
                f"{k} {'/'.join(a)} vs {'/'.join(b)}" for k, (a, b) in c["environment_differs"].items()))
        cov = c["coverage"]
        if cov["neutral_pairs"] < max(cov["baseline_neutral"], cov["run_neutral"]):
            left = ([f"professions {', '.join(cov['professions_left_out'])}"] if cov["professions_left_out"] else []) \
                + ([f"seeds {', '.join(map(str, cov['seeds_left_out']))}"] if cov["seeds_left_out"] else [])
            lines.append(f"**partial:** compared on the {cov['neutral_pairs']} neutral images both runs hold (baseline "
                         f"{cov['baseline_neutral']}, this run {cov['run_neutral']}; {cov['professions']} of "
                         f"{cov['baseline_professions']} professions)"
                         + (f"; not in both: {'; '.join(left)}" if left else ""))
        for note in c.get("notes", []):
            lines.append(f"note: {note}")
        lines.append("")
        lines.append(f"| metric | baseline | this run | difference [{lv}% CI, paired] | pairs |")
        lines.append("|---|---|---|---|---|")
        rows = list(c["entanglement"].items()) + [(f"{m}({s})", v) for s, blk in c["distribution"].items()
                                                  for m, v in blk.items()] + list(c.get("quality", {}).items())
        for name, v in rows:
            d = v["diff"]
            ci = f" [{num(d['lo'])}, {num(d['hi'])}]" if d["lo"] is not None else ""
            lines.append(f"| {name} | {num(v['baseline'])} | {num(v['other'])} | {num(d['mean'])}{ci} | "
                         f"{v['n_pairs']} |")
        lines.append("")
        if c["distribution"]:
            lines.append("Distribution rows are measured on the image pairs both runs classified (pairs), so their "
                         "baseline column can differ from the baseline's own report, which uses all its images.")
            lines.append("")
        if c.get("image_similarity"):
            lines.append(f"| image similarity to the baseline's image (cosine of features) | mean [{lv}% CI] | pairs |")
            lines.append("|---|---|---|")
            for name, v in c["image_similarity"].items():
                ci = f" [{num(v['lo'])}, {num(v['hi'])}]" if v.get("lo") is not None else ""
                lines.append(f"| {name} | {num(v['mean'])}{ci} | {v['n_pairs']} |")
            lines.append("")
    return "\n".join(lines)


def write_json(result: dict, path) -> Path:
    from .._io import atomic_write

    p = Path(path)
    atomic_write(p, json.dumps(result, indent=2).encode())
    return p
