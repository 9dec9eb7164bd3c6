"""generate_to_dir end to end on a tiny model: wall time, process CPU time and peak RSS of one run.

Compares fastfair trees (e.g. an old commit against the current one): each run imports the fastfair package of the
tree given, with the editable install's import redirect removed, so that two checkouts can be timed in turn.

    git worktree add /tmp/old ca72186
    python bench/bench_generate_to_dir.py /tmp/old /tmp/out_old 16
    python bench/bench_generate_to_dir.py . /tmp/out_new 16

Arguments: TREE OUT SEEDS (4 prompts x SEEDS images at 512x512, 1 step, maps of 2 words, reference backend).
"""
import os
import resource
import sys
import time

root = os.path.abspath(sys.argv[1])
sys.meta_path = [f for f in sys.meta_path if "skbc" not in type(f).__module__]  # scikit-build-core's redirect
sys.path.insert(0, root)
import fastfair  # noqa: E402

assert fastfair.__file__.startswith(root), fastfair.__file__
from fastfair.generation import generate_to_dir  # noqa: E402

pipe = fastfair.load_pipeline("tiny-sd")
prompts = [f"a photo of the face of a {p}" for p in ["doctor", "nurse", "pilot", "chef"]]
seeds = list(range(int(sys.argv[3])))
t = time.perf_counter()
gen = generate_to_dir(pipe, prompts, sys.argv[2], seeds=seeds, settings={"bench": 1}, batch_size=8,
                      maps=["face", "photo"], steps=1, height=512, width=512, progress=False, backend="reference",
                      overwrite=True)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"{root}: {len(gen)} images, {time.perf_counter() - t:.1f} s wall, CPU {ru.ru_utime + ru.ru_stime:.1f} s, "
      f"peak RSS {ru.ru_maxrss / 1024:.0f} MB")
