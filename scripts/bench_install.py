"""Time the README's first command (install, then `ctd demo`) from a fresh clone of HEAD, up to
the demo's first line of output: once with an empty pip cache, once warm. Prints JSON.

    .venv/bin/python scripts/bench_install.py [--limit 1800]

What new users wait for before anything happens: the install once took 9 min on a 2-core CPU,
mostly compiling llama-cpp-python. The goal is <= 3 min warm. Each run clones HEAD (commit
first: uncommitted changes are not timed) and uses a throwaway $CTD_CACHE, so the demo starts
as on a new machine and the shared cache is untouched. Each run lists the wheels pip built from
source for it (its cache keeps them, so a warm run should build none).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_command() -> list[str]:
    """The README's demo command, split into its `&&` steps."""
    readme = (ROOT / "README.md").read_text()
    line = next(ln.strip() for ln in readme.splitlines() if ln.strip().endswith("ctd demo"))
    return [step.strip() for step in line.split("&&")]


def first_line(cmd: str, cwd: Path, env: dict, limit: float) -> tuple[float, str]:
    """Seconds until `cmd` prints its first line (stdout or stderr), and that line; then stop it."""
    start = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], limit)[0]:
            return time.perf_counter() - start, f"(nothing within {limit:.0f} s)"
        line = proc.stdout.readline().rstrip()
        return time.perf_counter() - start, line
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(label: str, pip_cache: Path, limit: float) -> dict:
    """Clone HEAD into a temporary folder and run the README's demo command there."""
    built_before = built_wheels(pip_cache)
    with tempfile.TemporaryDirectory(prefix=f"ctd-install-{label}-") as tmp:
        clone = Path(tmp) / "ctd"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "PIP_CACHE_DIR": str(pip_cache), "CTD_CACHE": str(Path(tmp) / "cache")}
        env.pop("VIRTUAL_ENV", None)
        steps, total = [], 0.0
        *install, demo = demo_command()
        for cmd in install:
            start = time.perf_counter()
            done = subprocess.run(["bash", "-c", cmd], cwd=clone, env=env, capture_output=True,
                                  text=True, timeout=limit)
            seconds = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(f"{cmd!r} failed ({done.returncode}): {done.stderr[-2000:]}")
            steps.append({"cmd": cmd, "s": round(seconds, 1)})
            total += seconds
        seconds, line = first_line(demo, clone, env, limit)
        steps.append({"cmd": demo, "s_to_first_line": round(seconds, 1), "first_line": line})
        total += seconds
    return {"pip_cache": label, "s_to_first_demo_line": round(total, 1), "steps": steps,
            "wheels_built_from_source": sorted(built_wheels(pip_cache) - built_before)}


def built_wheels(pip_cache: Path) -> set[str]:
    """Each wheel pip built from an sdist (it caches them under wheels/); a platform tag other
    than none-any means a compiler ran."""
    return {p.name for p in (pip_cache / "wheels").rglob("*.whl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=1800, help="seconds allowed per step")
    args = parser.parse_args()
    from ctd.numerics import machine

    load_before = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ctd-pip-cache-") as pip_cache:
        runs = [run(label, Path(pip_cache), args.limit) for label in ("cold", "warm")]
    print(json.dumps({
        "commit": commit, "command": " && ".join(demo_command()),
        "machine": machine(), "cpus": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
