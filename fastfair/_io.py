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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` for one process (``fcntl.flock`` on ``folder/name``): a second
    fastfair process writing the same outputs is refused instead of mixing its files with the first's. The lock
    file is removed on release; the lock dies with the process (SIGKILL included)."""

    def __init__(self, folder, what: str, name: str = ".fastfair.lock"):
        self.path, self.what, self.fh = Path(folder) / name, what, None

    def __enter__(self):
        import fcntl

        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise FileExistsError(f"{self.path.parent} is a file, not a folder; choose another output folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise RuntimeError(f"another fastfair {self.what} process is writing to {self.path.parent}; wait for it "
                               "to finish, or use another output folder") from None
        self.fh = fh
        return self

    def __exit__(self, *exc):
        import fcntl

        if self.fh is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None
        return False
