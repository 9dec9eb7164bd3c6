"""The run directory of an audit: settings lock, committed rows, images, map shards, merged results.

Layout::

    RUN/audit.json                     settings (locked), work list, summary options
    RUN/parts/part-r{rank}-{id}.parquet  committed rows, one file per finished batch
    RUN/images/{id[:2]}/{work_id}.png
    RUN/maps/maps-r{rank}-{id}.safetensors  the batch's maps (float16), keys "{work_id}:{mode}:{word}:{role}"
                                       (compacted: maps-r{rank}-compact-{hash}.safetensors; a row's ``maps``
                                       column names its shard)
    RUN/results.parquet                merged rows (written at the end, by rank 0)
    RUN/summary.json, RUN/report.html
    RUN/locks/rank{r}.lock             held (flock) while a process works on the directory

A batch is committed by writing its images and map shard first, then its part file; every file
goes through a temporary file and an atomic rename, so a process killed at any instant leaves
either a complete part file or none. Every ``COMPACT_AT`` batch part files of a rank are merged into
one ``part-r{rank}-compact-{first}.parquet`` (written atomically before its sources are deleted, so a kill in
between leaves duplicate rows of the same work ids, which readers drop): a run of 100,000 images in
batches of 8 keeps ~50 part files instead of 12,500, and resuming reads them in seconds. Their map shards are
merged likewise (into shards of at most ``SHARD_BYTES``, written before the part that names them; the old shards
are deleted after the parts). Rows whose part file exists are done; ``--resume`` skips
them, and a batch cut short is simply redone (its images and shard are rewritten under the same
names). Stale temporary files (``.*.tmp``) are ignored and removed at the end.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

from .._env import add_environment
from .._io import atomic_write, release_flock, try_flock

COMPACT_AT = 256  # batch part files of one rank merged into one compacted part
SHARD_BYTES = 128 * 2 ** 20  # a compacted map shard holds about this much (a compaction's memory: about twice it)


def _is_work_id(s: str) -> bool:
    return len(s) == 20 and all(c in "0123456789abcdef" for c in s)
CONFIG = "audit.json"
RESULTS = "results.parquet"
SUMMARY = "summary.json"
REPORT = "report.html"
_OURS = ("parts", "images", "maps", "locks", CONFIG, RESULTS, SUMMARY, REPORT, "report-targets.html")


class RunDirError(ValueError):
    """A run directory that cannot be used for this audit as asked."""


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k not in new:
                out.append(f"{prefix}{k}: {_short(old[k])} in the run directory, absent now")
            elif k not in old:
                out.append(f"{prefix}{k}: absent in the run directory, {_short(new[k])} now")
            else:
                out.extend(_diff(old[k], new[k], f"{prefix}{k}."))
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: {_short(old)} in the run directory, {_short(new)} now"]
    return []


# settings recorded since the ninth session of 2026-11-26: a run directory made before them lacks them, and is
# compared without them (its rows were made with whatever they were; resuming it should still work)
LATER_KEYS = (("model_state",), ("generation", "backend"), ("classifier_weights",), ("clip_score_weights",),
              ("generation", "backend_env"))


def _as_recorded(old_settings: dict | None, new_settings: dict) -> dict:
    """``new_settings`` without the LATER_KEYS that ``old_settings`` does not record."""
    if not isinstance(old_settings, dict):
        return new_settings
    out = json.loads(json.dumps(new_settings, default=str))
    for path in LATER_KEYS:
        o, n = old_settings, out
        for k in path[:-1]:
            o, n = (o or {}).get(k), (n or {}).get(k)
        if isinstance(n, dict) and isinstance(o, dict) and path[-1] not in o:
            n.pop(path[-1], None)
    if isinstance(out.get("model_state"), dict):
        from ..pipelines import as_recorded_model_state

        out["model_state"] = as_recorded_model_state(old_settings.get("model_state"), out["model_state"])
    return out


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


class RunStore:
    def __init__(self, root, rank: int = 0):
        self.root = Path(root)
        self.rank = rank
        self._lock_fh = None
        self._batch_parts = 0  # batch part files this process wrote since the last compaction

    # ---------------------------------------------------------------- paths
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def parts_dir(self) -> Path:
        return self.root / "parts"

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS

    def image_relpath(self, work_id: str) -> str:
        return f"images/{work_id[:2]}/{work_id}.png"

    # ---------------------------------------------------------------- settings lock
    def read_config(self) -> dict | None:
        if not self.config_path.exists():
            return None
        try:
            cfg = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            cfg, why = None, str(e)
        else:
            missing = [k for k in ("settings", "work") if not isinstance(cfg, dict) or not isinstance(cfg.get(k), dict)]
            why = f"it has no {' or '.join(map(repr, missing))}" if missing else None
        if why:  # its images, maps and rows may be intact: do not advise deleting them
            raise RunDirError(f"{self.config_path} is damaged or not an audit record ({why}); restore it from a backup "
                              "copy to keep the run, or start fresh with another --out")
        return cfg

    def prepare(self, config: dict, *, resume: bool, overwrite: bool) -> str:
        """Check or create the settings lock (rank 0), holding this rank's process lock from here on.
        Returns "new", "resume" or "overwrite"."""
        locked = {"settings": config["settings"], "work": config["work"]}
        existing = self.read_config()
        from .._io import check_not_foreign

        try:  # another command's run folder (an --overwrite would have deleted its files)
            check_not_foreign(self.root, "audit.json", "audit")
        except ValueError as e:
            raise RunDirError(str(e)) from None
        if self.root.exists() and existing is None:
            foreign = [p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.name not in _OURS]
            if foreign:
                raise RunDirError(f"{self.root} exists and is not a fastfair audit directory (it has "
                                  f"{', '.join(sorted(foreign)[:5])}{'...' if len(foreign) > 5 else ''}); "
                                  "choose an empty or new --out")
        self.root.mkdir(parents=True, exist_ok=True)
        self.acquire()  # before looking at (or wiping) the rows: no other process may be writing them
        mode = "new"
        if existing is not None:
            old = {"settings": existing.get("settings"), "work": existing.get("work")}
            diffs = _diff(old, dict(locked, settings=_as_recorded(old["settings"], locked["settings"])))
            n_done = len(self.done_ids())
            if overwrite:
                self._wipe()
                mode = "overwrite"
            elif diffs:
                raise RunDirError(
                    f"{self.root} holds an audit made with different settings:\n  " + "\n  ".join(diffs[:12])
                    + ("\n  ..." if len(diffs) > 12 else "")
                    + f"\nIt has {n_done} finished image(s). To keep it, rerun with its settings and --resume; "
                    f"to start fresh, use another --out or pass --overwrite (deletes its results).")
            elif n_done and not resume:
                raise RunDirError(f"{self.root} already has {n_done} finished image(s) from this audit; pass --resume "
                                  "to continue it, or --overwrite to start again from scratch")
            else:
                mode = "resume" if n_done else "new"
        self.root.mkdir(parents=True, exist_ok=True)
        if existing is not None and mode != "overwrite" and "created" in existing:
            config = dict(config, created=existing["created"])
        if existing is not None and mode != "overwrite" and existing.get("environments"):
            envs = list(existing["environments"])  # every distinct environment that added rows to the run
            for e in config.get("environments", []):
                add_environment(envs, e)
            config = dict(config, environments=envs)
        atomic_write(self.config_path, json.dumps(config, indent=2).encode())  # keeps the listed order
        return mode

    def verify(self, config: dict) -> None:
        """Other ranks: the lock rank 0 wrote must be this process's settings."""
        existing = self.read_config()
        if existing is None:
            raise RunDirError(f"rank {self.rank}: {self.config_path} is missing; rank 0 should have written it")
        diffs = _diff({"settings": existing["settings"], "work": existing["work"]},
                      {"settings": _as_recorded(existing["settings"], config["settings"]), "work": config["work"]})
        if diffs:
            raise RunDirError(f"rank {self.rank} runs with settings different from rank 0's:\n  " + "\n  ".join(diffs))

    def _wipe(self) -> None:
        for name in _OURS:
            if name == "locks":
                continue
            p = self.root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    # ---------------------------------------------------------------- process lock
    def acquire(self) -> None:
        if self._lock_fh is not None:
            return
        fh = try_flock(self.root / "locks" / f"rank{self.rank}.lock")
        if fh is None:
            raise RunDirError(f"another fastfair audit process (rank {self.rank}) is working in {self.root}; "
                              "wait for it to finish, or use another --out")
        self._lock_fh = fh

    def release(self) -> None:
        if self._lock_fh is not None:
            release_flock(self._lock_fh)
            self._lock_fh = None

    # ---------------------------------------------------------------- rows
    def part_files(self) -> list[Path]:
        if not self.parts_dir.exists():
            return []
        return sorted(p for p in self.parts_dir.glob("part-*.parquet"))

    def done_ids(self) -> set[str]:
        import pyarrow.parquet as pq

        done: set[str] = set()
        for p in self.part_files():
            try:
                done.update(pq.read_table(p, columns=["work_id"]).column("work_id").to_pylist())
            except Exception as e:
                raise RunDirError(f"cannot read committed part {p} ({e}); delete that file and --resume to redo "
                                  "its images") from e
        return done

    def commit(self, rows: list[dict], schema, images: dict[str, bytes], maps: dict | None, tag: str) -> Path:
        """Write a batch: images, then its map shard, then its part file (the commit record)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        for rel, data in images.items():
            atomic_write(self.root / rel, data)
        if maps:
            from safetensors.torch import save as st_save

            atomic_write(self.root / f"maps/maps-r{self.rank}-{tag}.safetensors",
                         st_save({k: v.contiguous() for k, v in maps.items()}))
        table = pa.Table.from_pylist(rows, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        path = self.parts_dir / f"part-r{self.rank}-{tag}.parquet"
        atomic_write(path, buf.getvalue())
        self._batch_parts += 1
        if self._batch_parts >= COMPACT_AT:
            self.compact()
        return path

    def count_batch_parts(self) -> int:
        """Start the compaction count at the batch parts this rank's earlier sessions left (a run resumed again and
        again in sessions of fewer than COMPACT_AT batches was never compacted)."""
        self._batch_parts = len(self._my_batch_parts())
        return self._batch_parts

    def _my_batch_parts(self) -> list[Path]:
        """This rank's batch part files: ``part-r{rank}-{work id}`` (20 hex digits). Compacted ones are
        ``part-r{rank}-compact-{id}`` (before: ``-c{id}``, which a batch whose work id starts with "c" also
        matched: it was never compacted)."""
        pre = f"part-r{self.rank}-"
        return [p for p in self.part_files() if p.name.startswith(pre) and _is_work_id(p.stem[len(pre):])]

    def compact(self) -> Path | None:
        """Merge this rank's batch part files into one compacted part, and their map shards into a few compacted
        shards (each written atomically, shards first, the part's ``maps`` column pointing at them), then delete
        the sources: parts first, then the shards no part names any more. A kill at any point leaves every row
        pointing at a shard that exists (at worst duplicate rows, which readers drop, or unreferenced shards)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = self._my_batch_parts()
        self._batch_parts = 0
        if len(parts) < 2:
            return None
        table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
        first = parts[0].stem.split("-", 2)[2]
        old_shards: list[str] = []
        if "maps" in table.column_names:
            refs = table.column("maps").to_pylist()
            moved = self._compact_shards(refs)
            if moved:
                old_shards = list(moved)
                col = pa.array([moved.get(m, m) for m in refs], type=table.schema.field("maps").type)
                table = table.set_column(table.column_names.index("maps"), table.schema.field("maps"), col)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        out = self.parts_dir / f"part-r{self.rank}-compact-{first}.parquet"
        atomic_write(out, buf.getvalue())
        for p in parts:
            if p != out:
                p.unlink(missing_ok=True)
        if old_shards:  # only shards no surviving part names (an earlier compaction's part may still name one)
            named = self.named_shards()
            for rel in old_shards:
                if rel not in named:
                    (self.root / rel).unlink(missing_ok=True)
        return out

    def named_shards(self) -> set[str]:
        """The map shards the part files on disk name (their ``maps`` column)."""
        import pyarrow.parquet as pq

        named: set[str] = set()
        for p in self.part_files():
            try:
                if "maps" in pq.read_schema(p).names:
                    named.update(m for m in pq.read_table(p, columns=["maps"]).column("maps").to_pylist() if m)
            except Exception:  # noqa: BLE001 -- unreadable: keep every shard (done_ids reports the file)
                return {str(q.relative_to(self.root)) for q in (self.root / "maps").glob("*.safetensors")}
        return named

    def remove_unnamed_shards(self) -> int:
        """Delete map shards that no part file names (left by a kill inside a compaction). Only call when no process
        is writing: a batch in flight writes its shard before its part."""
        named = self.named_shards()
        n = 0
        for q in (self.root / "maps").glob("maps-*.safetensors"):
            if str(q.relative_to(self.root)) not in named:
                q.unlink(missing_ok=True)
                n += 1
        return n

    def _compact_shards(self, refs: list) -> dict[str, str]:
        """Merge this rank's per-batch map shards named in ``refs`` into compacted shards of about ``SHARD_BYTES``
        each (a compaction holds about twice that in memory: the tensors and their serialised bytes);
        {old relpath: new relpath}. Already-compacted shards, missing ones and a group of one are left as they are."""
        from safetensors.torch import load_file
        from safetensors.torch import save as st_save

        pre = f"maps/maps-r{self.rank}-"
        todo = [r for r in dict.fromkeys(refs) if r and r.startswith(pre) and _is_work_id(r[len(pre):-12])
                and r.endswith(".safetensors") and (self.root / r).exists()]
        if len(todo) < 2:
            return {}
        moved: dict[str, str] = {}
        groups, cur, size = [], [], 0
        for r in todo:
            n = (self.root / r).stat().st_size
            if cur and size + n > SHARD_BYTES:
                groups.append(cur)
                cur, size = [], 0
            cur.append(r)
            size += n
        groups.append(cur)
        for g in groups:
            if len(g) < 2:
                continue
            tensors: dict = {}
            for r in g:
                tensors.update(load_file(str(self.root / r)))
            # named by its sources: a compaction redone after a kill with other sources never overwrites a shard
            # that a surviving compacted part still names
            new = f"{pre}compact-{hashlib.sha256(chr(10).join(g).encode()).hexdigest()[:20]}.safetensors"
            atomic_write(self.root / new, st_save(tensors))
            moved.update({r: new for r in g})
        return moved

    def read_rows(self):
        """All committed rows (pandas), duplicates of a work id dropped (the first file in name order wins)."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = self.part_files()
        if not parts:
            return pd.DataFrame()
        tables = [pq.read_table(p) for p in parts]
        df = pa.concat_tables(tables, promote_options="default").to_pandas()
        return df.drop_duplicates("work_id", keep="first").reset_index(drop=True)

    def merge(self, order: list[str] | None = None, config: dict | None = None):
        """Merge all parts into results.parquet (atomic). ``order``: work ids in plan order. The file says which
        run it is: a ``run_id`` column (the settings hash, constant: concatenated runs stay apart) and the run's
        audit.json (``config``, else read) under the Parquet key-value metadata key ``fastfair``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        df = self.read_rows()
        if order is not None and len(df):
            rank = {w: i for i, w in enumerate(order)}
            df = df.assign(_o=df["work_id"].map(rank)).sort_values("_o", kind="stable").drop(columns="_o")
            df = df.reset_index(drop=True)
        import pandas as pd

        config = config or self.read_config() or {}
        if config.get("settings_hash") and "run_id" not in df.columns:  # dictionary-encoded in Parquet
            df.insert(0, "run_id", pd.Categorical([config["settings_hash"]] * len(df)))
        table = pa.Table.from_pandas(df, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[b"fastfair"] = json.dumps(config, ensure_ascii=False).encode()
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf)
        atomic_write(self.results_path, buf.getvalue())
        return df

    def cleanup_temps(self) -> int:
        """Remove temporary files left by killed processes. Only call when no process is writing."""
        n = 0
        for p in self.root.rglob(".*.tmp"):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
        return n


def load_results(run_dir):
    """The results of a run directory as a pandas DataFrame (results.parquet, else the committed parts)."""
    import pandas as pd

    store = RunStore(run_dir)
    if store.config_path.exists() is False:
        raise RunDirError(f"{run_dir} is not a fastfair audit directory (no {CONFIG})")
    if store.results_path.exists():
        return pd.read_parquet(store.results_path)
    return store.read_rows()
