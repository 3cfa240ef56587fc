"""Atomic writes: outputs appear complete under their final name or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ctd.errors import CtdError


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to `final` only if the body succeeds.

    An existing `final` is refused unless `overwrite`; with `overwrite` it is replaced only after
    the new content is complete, so a failure never leaves a half-written or missing output.
    """
    final = Path(final).expanduser().resolve()
    if final.exists() and not overwrite:
        raise CtdError(f"output directory {final} already exists; pass --overwrite or choose another")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    except OSError as e:
        raise CtdError(f"cannot write under {parent}: {e.strerror}; choose a writable --out") from e
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: object) -> None:
    """Write JSON via a temporary file and rename (readers never see a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


class Stages:
    """Run-once steps of a recipe: each result is stored as JSON under `root/stages/` when its
    step finishes, so an interrupted or repeated recipe continues from what is done."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "stages"

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
