"""MIST edit speed (no classifier rounds) and the unrelated-prompt change report.

Edits all 16 cross-attention layers (to_k and to_v: 32 projections) of ``sd15-shaped`` for 35
concepts (the first 35 WinoBias occupations) in one round driven by given distributions
(``measured=``, no images, no classifier). The timed call is the whole ``fastfair.mist.mist``:
prompt checks, text encoding of the concept and attribute prompts (``pipe.encode_prompt``), targets,
the float64 Cholesky solve of all rows at once, and writing the weights. Pipeline loading is not
timed. Acceptance: < 5 s on CPU.

Then it reports the relative to_k/to_v output change ``||dW k|| / ||W k||`` (max over layers) for the
edited concepts and for 20 unrelated prompts, with each prompt's EOS-key cosine to the nearest concept.
The presets' text encoders are random (2 layers), so every EOS key is close to every other and
unrelated prompts move more than they would in a trained CLIP encoder.

    python bench/bench_mist.py [--model sd15-shaped] [--repeats 5] [--attributes gender] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

UNRELATED = [
    "a photo of a mountain lake", "a bowl of fresh fruit on a table", "a red sports car", "a city skyline at night",
    "a cat sleeping on a sofa", "a snowy forest", "a sailing boat at sea", "a plate of pasta",
    "an old stone bridge", "a field of sunflowers", "a bicycle leaning on a wall", "a lighthouse on a cliff",
    "a cup of coffee", "a desert with sand dunes", "a wooden chair", "a waterfall in the jungle",
    "a bookshelf full of books", "a hot air balloon", "a tropical beach", "a vintage clock",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sd15-shaped")
    ap.add_argument("--concepts", type=int, default=35)
    ap.add_argument("--attributes", default="gender", help="e.g. gender or gender,race,age (8 joint classes)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import fastfair
    from fastfair import mist
    from fastfair.audit.prompts import WINOBIAS

    pipe = fastfair.load_pipeline(args.model)
    concepts = list(dict.fromkeys(c.lower() for c in WINOBIAS))[:args.concepts]
    sets = mist.parse_attributes(args.attributes)
    K = len(mist.joint_classes(sets)[0])
    # a skewed measured distribution per concept (as an audit would give): all mass on one class
    measured = {c: [1.0 if j == i % K else 0.0 for j in range(K)] for i, c in enumerate(concepts)}
    n_layers = len(mist.edit_layers(pipe))
    names = [n for n, _ in mist._projections(mist.edit_layers(pipe), True)]
    originals = {n: pipe.unet.get_submodule(n).weight.detach().clone() for n in names}

    times = []
    for r in range(args.repeats + 1):  # the first run warms up (tokenizer caches, thread pools)
        t0 = time.perf_counter()
        edit = mist.mist(pipe, concepts, sets, measured=measured, progress=False)
        dt = time.perf_counter() - t0
        if r < args.repeats:
            edit.revert(pipe)
        if r:
            times.append(dt)
    assert all(not torch.equal(pipe.unet.get_submodule(n).weight, originals[n]) for n in names)

    # the closed form alone, for the same system
    K_e = mist.eos_keys(pipe, edit.meta["concept_prompts"])
    K_p = mist.preserve_keys(pipe, [""])
    W = torch.cat([originals[n].double() for n in names])
    V = K_e @ W.T
    solve = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        mist.closed_form(W, K_e, V, K_p)
        solve.append(time.perf_counter() - t0)

    concept_rows = edit.output_change(pipe, edit.meta["concept_prompts"])
    unrelated = edit.output_change(pipe, UNRELATED)
    edit.revert(pipe)
    assert all(torch.equal(pipe.unet.get_submodule(n).weight, originals[n]) for n in names)

    med = statistics.median(times)
    print(f"MIST on {args.model}: {n_layers} cross-attention layers, {len(names)} projections "
          f"({W.shape[0]} rows x {W.shape[1]}), {len(concepts)} concepts x {K} classes ({args.attributes}), "
          f"no classifier rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"  whole edit: median {med:.3f} s, min {min(times):.3f} s over {len(times)} runs  "
          f"[acceptance < 5 s: {'PASS' if med < 5 else 'FAIL'}]")
    print(f"  closed-form solve of all rows (float64 Cholesky): median {statistics.median(solve) * 1e3:.1f} ms")
    print("  relative output change ||dW k||/||W k|| (max over layers):")
    cv = [r["to_v_eos"] for r in concept_rows]
    print(f"    edited concepts ({len(cv)}), EOS: to_v median {statistics.median(cv):.4f} max {max(cv):.4f}")
    print(f"    {'prompt':<36} {'to_v EOS':>9} {'to_v max':>9} {'to_k EOS':>9} {'to_k max':>9} {'EOS cos':>8}")
    for r in unrelated:
        print(f"    {r['prompt']:<36} {r['to_v_eos']:9.4f} {r['to_v_max']:9.4f} {r['to_k_eos']:9.4f} "
              f"{r['to_k_max']:9.4f} {r['eos_cos']:8.3f}")
    uv = [r["to_v_eos"] for r in unrelated]
    print(f"    unrelated median to_v EOS {statistics.median(uv):.4f} "
          f"({statistics.median(uv) / statistics.median(cv):.2f}x the concepts' median)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "concepts": len(concepts), "classes": K, "layers": n_layers,
                       "times_s": times, "solve_s": solve, "concepts_change": concept_rows,
                       "unrelated_change": unrelated}, fh, indent=1)


if __name__ == "__main__":
    main()
