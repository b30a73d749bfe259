"""Cold-start cost of `memplan estimate`: each command runs N times as a fresh process.

    python benchmarks/cold_start.py            # N=20, the shipped commands and the baselines
    python benchmarks/cold_start.py -n 50 --memplan .venv/bin/memplan
    python benchmarks/cold_start.py --instructions   # + instruction counts under valgrind

Wall time is noisy on a shared machine; the CPU time (user + sys of the child, from os.wait4)
is what to compare between runs. The baselines (`python -c pass`, `python -c "import pydantic"`
and the three imports the estimate path needs) are measured in the same run, interleaved with
the commands, so they see the same load. Target (issue 9): median wall <= 0.15 s for both
memplan commands on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from importlib.metadata import version


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, user+sys CPU seconds, exit status) of one fresh process."""
    with open(os.devnull, "wb") as null:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=null, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20, help="runs per command (default 20)")
    ap.add_argument("--memplan", default=None, help="memplan executable (default: the one beside this python, else PATH)")
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--instructions", action="store_true",
                    help="also count each command's instructions once under valgrind (deterministic, unlike time)")
    args = ap.parse_args()

    py = sys.executable
    exe = args.memplan or os.path.join(os.path.dirname(py), "memplan")
    if not os.path.exists(exe):
        exe = shutil.which("memplan") or sys.exit("no memplan executable found: pip install -e . or pass --memplan")
    env = dict(os.environ, COLUMNS="130")
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    # a normal install runs from cached .pyc files; with PYTHONDONTWRITEBYTECODE set (some CI and
    # container images) every run recompiles memplan's own modules from source, ~20% of a cold start
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        print("note: PYTHONDONTWRITEBYTECODE is set here; unset for the measured commands so their .pyc files are cached")

    cases = [
        ("python -c pass", [py, "-c", "pass"]),
        ("python -c 'import pydantic'", [py, "-c", "import pydantic"]),
        ("python -c 'import pydantic, typer, rich.table'", [py, "-c", "import pydantic, typer, rich.console, rich.table"]),
        # the first model pulls in the rest of pydantic (schema generation, plugin discovery)
        ("  ... and define one pydantic model", [py, "-c", "import pydantic, typer, rich.console, rich.table\n"
                                                "class M(pydantic.BaseModel): x: int"]),
        (f"memplan estimate -m {args.model}", [exe, "estimate", "-m", args.model]),
        (f"memplan estimate -m {args.model} --json", [exe, "estimate", "-m", args.model, "--json"]),
    ]
    for _, argv in cases:  # warm the page cache and .pyc files; a failing command stops the benchmark
        _, _, rc = run_once(argv, env)
        if rc != 0:
            sys.exit(f"{' '.join(argv)} exited with {rc}")

    walls: dict[str, list[float]] = {name: [] for name, _ in cases}
    cpus: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(args.n):  # interleaved: load on the machine hits every case alike
        for name, argv in cases:
            wall, cpu, _ = run_once(argv, env)
            walls[name].append(wall)
            cpus[name].append(cpu)

    print(f"python {sys.version.split()[0]}, pydantic {version('pydantic')}, typer {version('typer')}, "
          f"rich {version('rich')}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}; {args.n} runs each")
    print(f"memplan: {exe}")
    print(f"{'command':52s} {'median wall':>12s} {'min wall':>10s} {'median cpu':>11s} {'min cpu':>9s}")
    for name, _ in cases:
        print(f"{name:52s} {statistics.median(walls[name]):>11.3f}s {min(walls[name]):>9.3f}s "
              f"{statistics.median(cpus[name]):>10.3f}s {min(cpus[name]):>8.3f}s")

    if args.instructions:
        if not shutil.which("valgrind"):
            sys.exit("--instructions needs valgrind")
        print(f"{'command':52s} {'instructions':>14s}")
        for name, argv in cases:
            out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                                  *argv], env=dict(env, PYTHONHASHSEED="0"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            refs = [line.split(":")[1].strip() for line in out.stderr.splitlines() if "I   refs" in line or "I refs" in line]
            print(f"{name:52s} {refs[0] if refs else '?':>14s}")


if __name__ == "__main__":
    main()
