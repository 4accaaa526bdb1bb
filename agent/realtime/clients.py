"""The real Realtime client libraries, in a virtual environment of their own, built once and cached.

They cannot live in the project's environment: livekit-agents pins another `livekit` than ours. The environment
(`.cache/realtime-clients-venv`, ignored by git) holds the pinned versions below; `ensure_client_env()` builds it
with pip when it is missing or was built for other pins (a stamp file records them), under a file lock so two
processes never build it at once. The client programs in agent/realtime/drivers/ run in it as subprocesses.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ENV = REPO / ".cache" / "realtime-clients-venv"
DRIVERS = Path(__file__).resolve().parent / "drivers"
# One environment resolves all three (checked on Python 3.11): livekit-agents 1.8.9 pins livekit 1.1.21.
REQUIREMENTS = (
    "openai[realtime]==3.60.0",
    "livekit-agents==1.8.9",
    "livekit-plugins-openai==1.8.9",
    "pipecat-ai==1.14.0",
)
STAMP = ".speechgpt-rt-clients.json"


class ClientEnvError(RuntimeError):
    """The client environment could not be built (no network, pip failure...)."""


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def _stamp() -> dict:
    return {"requirements": list(REQUIREMENTS), "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def is_ready(env: Path = DEFAULT_ENV) -> bool:
    stamp = env / STAMP
    try:
        return python_of(env).exists() and json.loads(stamp.read_text()) == _stamp()
    except (OSError, ValueError):
        return False


def ensure_client_env(env: Path = DEFAULT_ENV, log=print, timeout_s: float = 1800) -> Path:
    """The client environment's python, built first if needed. Raises ClientEnvError with pip's last words."""
    env = Path(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / (env.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(env):
            return python_of(env)
        log(f"building the Realtime client environment in {env} (once: {', '.join(REQUIREMENTS)})")
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(env)],
            [str(python_of(env)), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
        ]
        for cmd in steps:
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                      env={**os.environ, "PIP_NO_INPUT": "1"})
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ClientEnvError(f"{' '.join(cmd[:4])}...: {exc}") from exc
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
                raise ClientEnvError(f"{' '.join(cmd[:4])}... failed (exit {done.returncode}):\n" + "\n".join(tail))
        (env / STAMP).write_text(json.dumps(_stamp()))
        return python_of(env)


def run_driver(python: Path, driver: str, args: list[str], timeout_s: float = 900) -> subprocess.CompletedProcess:
    """Run agent/realtime/drivers/<driver>.py in the client environment (its own working directory, so nothing
    of the project is importable there)."""
    cmd = [str(python), str(DRIVERS / f"{driver}.py"), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("LIVEKIT_AGENTS_DISABLE_TELEMETRY", "1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=tempfile.gettempdir(), env=env)
