"""One virtual environment per traced stack, built on demand and reused.

Stacks pin libraries that cannot share an environment (transformers 4.57 needs huggingface-hub 0.x,
transformers 5.23 needs >= 1.31; litgpt needs huggingface-hub < 1.4; torchtune 0.6.1 needs torchao
0.11.0), so each stack's real step is traced in a venv of its own under `.stack-envs/<stack>`,
from the pins in `validate/stacks/<stack>.txt` plus the local CPU torch wheel and memplan itself
(editable, no dependencies: the trace scripts import memplan.validate.tracker). A venv is rebuilt
when its pins change (a hash of the pins file is stamped in it). The trace scripts run as
`python -m memplan.validate.stacks.<module>` there, read one JSON request on stdin and print one
JSON result on stdout, so the main environment never imports a second transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PINS = Path(__file__).resolve().parent / "stacks"
TORCH = "torch==2.13.0"


def env_root() -> Path:
    return Path(os.environ.get("MEMPLAN_STACK_ENVS", REPO / ".stack-envs"))


def pins_file(stack: str) -> Path:
    path = PINS / f"{stack}.txt"
    if not path.is_file():
        raise ValueError(f"no pinned environment for stack {stack!r}: {path} is missing")
    return path


def python_of(stack: str) -> Path:
    return env_root() / stack / "bin" / "python"


def ensure(stack: str) -> Path:
    """The stack's venv python, built (or rebuilt, if its pins changed) first. One build at a time across
    processes (pytest-xdist's workers build the stacks' venvs side by side, and two editable installs of
    this repository race on its build files): an exclusive lock on `env_root()/.lock`."""
    import fcntl

    env_root().mkdir(parents=True, exist_ok=True)
    with open(env_root() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure(stack)


def _ensure(stack: str) -> Path:
    pins = pins_file(stack)
    stamp_value = hashlib.sha256(pins.read_bytes() + TORCH.encode()).hexdigest()
    venv = env_root() / stack
    stamp = venv / ".memplan-pins"
    py = python_of(stack)
    if py.exists() and stamp.is_file() and stamp.read_text() == stamp_value:
        return py
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    # --no-compile: the venv runs a few trace scripts once; byte-compiling every module costs a minute
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    subprocess.run([*pip, TORCH, "-r", str(pins)], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True)
    stamp.write_text(stamp_value)
    return py


def run(stack: str, module: str, request: dict, timeout: float = 600) -> dict:
    """Run `memplan.validate.stacks.<module>` in the stack's venv with one JSON request; its JSON reply."""
    py = ensure(stack)
    proc = subprocess.run([str(py), "-m", f"memplan.validate.stacks.{module}"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{stack} trace {module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
