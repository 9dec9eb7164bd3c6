"""Atomic file writes: every file fastfair writes appears whole or not at all."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename
    (file mode as ``open`` would give under the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and not e.filename:  # a full disk names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def try_flock(path: Path):
    """An open handle holding an exclusive ``fcntl.flock`` on ``path`` (created with its folder), or None when another
    process holds it. The lock dies with the process (SIGKILL included)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def flock_held(path) -> bool:
    """Whether another process holds ``try_flock``'s lock on ``path`` now (a check before minutes of model loading;
    the lock itself is still taken, race-free, when the work starts). Creates nothing."""
    import fcntl

    path = Path(path)
    if not path.is_file():
        return False
    try:
        fh = open(path, "a+")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def release_flock(fh) -> None:
    import fcntl

    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    fh.close()


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` for one process (``try_flock`` on ``folder/name``): a second
    fastfair process writing the same outputs is refused instead of mixing its files with the first's. The lock
    file is removed on release."""

    def __init__(self, folder, what: str, name: str = ".fastfair.lock"):
        self.path, self.what, self.fh = Path(folder) / name, what, None

    def __enter__(self):
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise FileExistsError(f"{self.path.parent} is a file, not a folder; choose another output folder")
        self.fh = try_flock(self.path)
        if self.fh is None:
            raise RuntimeError(f"another fastfair {self.what} process is writing to {self.path.parent}; wait for it "
                               "to finish, or use another output folder")
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.path.unlink(missing_ok=True)
            release_flock(self.fh)
            self.fh = None
        return False


def read_text_lines(path, what: str, inline_comments: bool = True) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped, without '#' comments: a line starting with '#', and with
    ``inline_comments`` also '#' after a space ("nurse  # note"; not inside a word: "C#"). Raises ValueError naming
    ``what`` and the file when it is missing or unreadable."""
    import re

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a folder; give a text file")
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a leading byte-order mark (Windows editors) is not text
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {what} {str(p)!r}: {e}") from e
    comment = r"(?:^|\s)#" if inline_comments else r"^\s*#"
    return [x for x in (re.split(comment, ln, maxsplit=1)[0].strip() for ln in text.splitlines()) if x]


def png_bytes(img) -> bytes:
    """A PIL image as PNG file bytes."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_ENCODERS = None
_ENCODERS_LOCK = __import__("threading").Lock()


def encode_pngs(images) -> list[bytes]:
    """PNG bytes of each image, encoded on up to 4 threads (PIL's encoder releases the GIL: 512 px images take
    ~0.1-0.3 s each on one core, the GPU's time for several images)."""
    global _ENCODERS
    images = list(images)
    if len(images) < 2:
        return [png_bytes(im) for im in images]
    with _ENCODERS_LOCK:  # the audit writer and a caller's thread may ask at once
        if _ENCODERS is None:
            from concurrent.futures import ThreadPoolExecutor

            _ENCODERS = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                           thread_name_prefix="fastfair-png")
    return list(_ENCODERS.map(png_bytes, images))


class BackgroundWriter:
    """Writes a batch's files on one background thread while the next batch is generated. At most one job is in
    flight: ``submit`` first waits for the previous one (and raises its error); ``drain`` waits for it; ``close``
    drains and stops the thread -- call it in a ``finally`` so that a batch already generated is written also on
    Ctrl-C or an error (its commit record, written last by the job, makes it count)."""

    def __init__(self, name: str):
        self.name = name
        self._ex = None
        self._pending = None

    def submit(self, fn, *args) -> None:
        self.drain()
        if self._ex is None:
            from concurrent.futures import ThreadPoolExecutor

            self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._pending = self._ex.submit(fn, *args)

    def drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self._ex is not None:
                self._ex.shutdown(wait=True)
                self._ex = None


# the record file each command leaves in its run folder
RUN_RECORDS = {"audit.json": "an audit run", "dft.json": "a DFT finetuning run", "generation.json": "a generation",
               "bench.json": "a bench run"}


def check_not_foreign(out, mine: str, command: str) -> None:
    """Refuse ``out`` when it is another command's run folder -- whatever --overwrite says: an overwrite deleted an
    audit's images under a generation's name, and two commands' reports fought over one file. (A folder inside a
    run, e.g. an audit of a DFT run's LoRA under runs/dft/, shares no file with it and is fine.) ``mine``: this
    command's record file name."""
    out = Path(out)
    if out.is_dir():
        for name, what in RUN_RECORDS.items():
            if name != mine and (out / name).is_file():
                raise ValueError(f"{command}: {str(out)!r} is {what} ({name}); choose another folder")
        if mine != "generation.json" and (out / ".parts" / "run.json").is_file():
            raise ValueError(f"{command}: {str(out)!r} holds an unfinished generation (.parts); choose another folder")
