"""Run the CPU-scale twins of the source studies (`studies/cpu/`) and rebuild `docs/results/`.

Each study runs with `sweeper study run SPEC --quiet` (resuming it if it was interrupted; a complete one
is not run again), then its report is written to `docs/results/<study>/` beside `RUN.md` (from
`run.json`): the command, the commit, the host and the wall time of the run, and the commit of the report.
The findings page `docs/results/README.md` is written by hand from those reports.

    python tools/reproduce.py                  # every study; a complete one only gets its report rebuilt
    python tools/reproduce.py --fresh          # delete each study first and run it from scratch
    python tools/reproduce.py --only slowmo-cpu --only diloco-cpu

This is a benchmark, not a test: the set takes about 1.5 hours on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "studies" / "cpu"
RESULTS = ROOT / "docs" / "results"


def sweeper(*args: str, log: Path | None = None) -> int:
    cmd = [sys.executable, "-m", "sweeper.cli", *args]
    if log is None:
        return subprocess.call(cmd, cwd=ROOT)
    with log.open("w") as out:  # the study's own lines, kept beside its report
        return subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def host() -> str:
    """The machine in words (no host name): CPU model, cores, OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__} (threads {torch.get_num_threads()})")


def complete(name: str) -> bool:
    """Whether study NAME exists and every trial is finished (its run is then not repeated)."""
    out = subprocess.run([sys.executable, "-m", "sweeper.cli", "study", "status", name, "--json"], cwd=ROOT,
                         capture_output=True, text=True)
    return out.returncode == 0 and json.loads(out.stdout.splitlines()[-1]).get("complete", False)


def run_one(spec_path: Path, fresh: bool) -> tuple[str, float | None, int]:
    """Run the study (unless it is complete), then rebuild its report; `run.json` keeps how it ran."""
    name = yaml.safe_load(spec_path.read_text())["name"]
    out = RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    rel = spec_path.relative_to(ROOT)
    record = out / "run.json"
    if fresh:
        sweeper("study", "delete", name, "--yes", log=out / "delete.log")
        (out / "delete.log").unlink()
    if fresh or not complete(name) or not record.exists():
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "trainers", "sweeper", str(rel)))
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        code = sweeper("study", "run", str(rel), "--quiet", log=out / "run.log")
        wall = time.perf_counter() - t0
        record.write_text(json.dumps({"command": f"sweeper study run {rel} --quiet", "commit": commit, "dirty": dirty,
                                      "host": host(), "started": f"{started:%Y-%m-%d %H:%M} UTC",
                                      "wall_s": round(wall), "exit": code}, indent=1) + "\n")
        print(f"{name}: exit {code} after {wall:.0f} s", flush=True)
    ran = json.loads(record.read_text())
    if ran["exit"] == 0:
        for stale in out.iterdir():  # a report's files from an earlier build (a plot it no longer draws)
            if stale.name not in ("run.json", "run.log", "RUN.md") and stale.is_file():
                stale.unlink()
        sweeper("study", "report", name, "--out", str(out.relative_to(ROOT)), "--no-log")
    (out / "RUN.md").write_text(
        f"# How `{name}` was run\n\n"
        f"- `{ran['command']}` (by `python tools/reproduce.py --only {name}`) at commit `{ran['commit']}`"
        f"{' with uncommitted changes' if ran['dirty'] else ''}; its output: [run.log](run.log)\n"
        f"- host: {ran['host']}\n"
        f"- started {ran['started']}; wall time {ran['wall_s']} s; exit status {ran['exit']}\n"
        f"- report: `sweeper study report {name} --out {out.relative_to(ROOT)} --no-log` at commit "
        f"`{git('rev-parse', 'HEAD')}`\n")
    return name, ran["wall_s"], ran["exit"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="a study name (repeatable)")
    parser.add_argument("--fresh", action="store_true", help="delete each study first")
    args = parser.parse_args()
    specs = sorted(SPECS.glob("*.yaml"))
    if args.only:
        names = {yaml.safe_load(p.read_text())["name"]: p for p in specs}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            parser.error(f"no study named {', '.join(unknown)} in {SPECS.relative_to(ROOT)} "
                         f"(there are: {', '.join(names)})")
        specs = [names[n] for n in args.only]
    results = [run_one(p, args.fresh) for p in specs]
    for name, wall, code in results:
        print(f"{name:26s} {wall:7.0f} s  exit {code}")
    return max((code for _, _, code in results), default=0)


if __name__ == "__main__":
    sys.exit(main())
