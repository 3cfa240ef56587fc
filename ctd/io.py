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
        raise CtdError(f"output directory {final} already exists; pass --overwrite true or choose another")
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
    step finishes, so an interrupted or repeated recipe continues from what is done.

    The recipe's config is kept in `root/recipe.json`; a later run with a different config is
    refused, since its finished steps would silently stand for another experiment.
    """

    def __init__(self, root: Path, config: dict, free: tuple[str, ...] = ("threads", "out")):
        self.dir = Path(root) / "stages"
        saved = Path(root) / "recipe.json"
        config = {k: v for k, v in json.loads(json.dumps(config, default=str)).items()
                  if k not in free}  # `free` settings do not change what is computed
        if saved.exists():
            old = json.loads(saved.read_text())
            diff = sorted(k for k in old.keys() | config.keys() if old.get(k) != config.get(k))
            if diff:
                raise CtdError(f"{root} holds a run of a different recipe config (differs in: "
                               f"{', '.join(diff)}); use the same config or another output dir")
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
