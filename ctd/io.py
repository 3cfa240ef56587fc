"""Where ctd keeps its cache, and outputs that survive crashes: atomic writes, one lock per run
directory, config checks.

Outputs appear complete under their final name or not at all (a temporary sibling renamed at
the end), with the modes the user's umask gives any new file; a full disk is one clear error
that leaves the previous result in place. A run directory is used by one process at a time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from ctd.errors import CtdError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of ctd's cache; `$CTD_CACHE` overrides `~/.cache/ctd`."""
    return Path(os.environ.get("CTD_CACHE", Path.home() / ".cache" / "ctd")).expanduser()


@cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def disk_full(e: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) says the disk or quota is full,
    whichever library raised it (torch.save reports a short write as a RuntimeError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in ("No space left on device", "StorageFull", "Disk quota")):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to `final` only if the body succeeds.

    An existing `final` is refused unless `overwrite`; with `overwrite` it is replaced only after
    the new content is complete, so a failure never leaves a half-written or missing output.
    """
    final = Path(final).expanduser().resolve()
    if final.exists() and not overwrite:
        raise CtdError(f"output directory {final} already exists; pass --overwrite or choose "
                       "another")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the result from colleagues
    except OSError as e:
        raise CtdError(f"cannot write under {parent}: {e.strerror}; choose a writable --out") from e
    try:
        yield tmp
        _umask_modes(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except Exception as e:
        if disk_full(e):
            raise CtdError(f"no space left on the device while writing {final}; free some "
                           "space and run again (nothing was written there; a previous result "
                           "is intact)") from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask_modes(root: Path) -> None:
    """Give every file under `root` the mode the umask gives a new file: safetensors writes
    its files 0600, which would hide the weights from everyone else who can read the folder."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(0o666 & ~_umask() | path.stat().st_mode & 0o111 & ~_umask())


def write_json(path: Path, obj: object) -> None:
    """Write JSON via a temporary file and rename (readers never see a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


class RunLock:
    """An exclusive lock on a run directory (`DIR/.lock`, holding the owner's pid and host).

    A second process aiming at the same directory is refused at once. The lock is the kernel's
    (flock), so it dies with its process, kill -9 included; the next run takes the directory
    over and says whose lock it was."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CtdError(f"{self.path.parent} is in use by {owner}; wait for that run to end "
                           "or choose another --out") from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.warning("%s was left locked by %s, which is no longer running; taking it over",
                        self.path.parent, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # a clean exit leaves no owner behind
        if [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
            self.path.unlink()  # nothing was written (e.g. bad input): leave nothing behind
            if self.created:
                self.path.parent.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config(saved: Path, config: dict, free: set[str]) -> None:
    """The one "may this run continue that directory?" check: `config` must equal the config
    saved at `saved` except in `free` keys (settings that do not change what is computed)."""
    if not saved.exists():
        raise CtdError(f"{saved.parent} holds no {saved.name}: it was not made by this command")
    old = _flat(json.loads(saved.read_text()))
    new = _flat(json.loads(json.dumps(config, default=str)))
    diff = sorted(k for k in old.keys() | new.keys() if k not in free and old.get(k) != new.get(k))
    if diff:
        raise CtdError(f"{saved.parent} was made by a different config (differs in: "
                       f"{', '.join(diff)}); use the same config or choose another output dir")


class Stages:
    """Run-once steps of a recipe: each result is stored as JSON under `root/stages/` when its
    step finishes, so an interrupted or repeated recipe continues from what is done.

    The recipe's config is kept in `root/recipe.json`; a later run with a different config is
    refused (`check_config`), since its finished steps would silently stand for another
    experiment.
    """

    def __init__(self, root: Path, config: dict, free: set[str]):
        self.dir = Path(root) / "stages"
        saved = Path(root) / "recipe.json"
        if saved.exists():
            check_config(saved, config, free)
        else:
            write_json(saved, config)

    def done(self, name: str) -> bool:
        return (self.dir / f"{name}.json").exists()

    def once(self, name: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` the first time; its stored JSON result every later time."""
        path = self.dir / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        result = fn(*args, **kwargs)
        write_json(path, result)
        return json.loads(path.read_text())
