"""A real LiveKit server for tests and benchmarks: the pinned livekit-server, built with `go install`, run in a
private network namespace (docs/livekit.md, A real server on one machine).

- `ensure_server_binary()` builds `github.com/livekit/livekit-server/cmd/server@PINNED` once into `.cache/go`
  (GOPATH, GOCACHE and GOBIN all under the repository, ignored by git) and returns the binary; later calls find it.
- `NetNamespace` creates a namespace with one veth pair whose two ends both live inside it, each with a private
  address (libwebrtc gathers no loopback candidates, so server and clients must talk over a real interface), and
  always deletes it. `enter()` moves the calling thread into it (Linux network namespaces are per thread; threads
  and processes started afterwards inherit it), `exit()` moves it back.
- `DevServer` writes a config, starts the server inside the namespace, waits until `GET /` answers `OK` (the server
  exits 0 on some config errors, so "the process is running" proves nothing), stops it SIGTERM, SIGTERM, SIGKILL,
  and can be restarted on the same ports.

Nothing here sends traffic anywhere but to the namespace's own addresses.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_MODULE = "github.com/livekit/livekit-server/cmd/server"
SERVER_VERSION = "v1.13.5"
GO_ROOT = REPO / ".cache" / "go"
BUILD_TIMEOUT_S = 40 * 60  # ~3.5 min on an idle 2-core machine; CI machines are loaded
CLONE_NEWNET = 0x40000000
NS_PREFIX = "sgrt-lk-"
API_KEY = "devkey"


class DevServerError(RuntimeError):
    """The namespace or the server could not be made (the message says which step and why)."""


def server_binary_path(version: str = SERVER_VERSION) -> Path:
    return GO_ROOT / "bin" / f"livekit-server-{version}" / "server"


def go_env(version: str = SERVER_VERSION) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOPATH=str(GO_ROOT / "path"), GOCACHE=str(GO_ROOT / "build"), GOBIN=str(server_binary_path(version).parent),
               GOFLAGS="-modcacherw", GOTOOLCHAIN="local")
    return env


def ensure_server_binary(version: str = SERVER_VERSION, log=print, timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """The pinned server binary, built with `go install` when missing (a file lock keeps concurrent callers from
    building twice)."""
    binary = server_binary_path(version)
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None)
    if go is None:
        raise DevServerError("building livekit-server needs the Go toolchain (go 1.26+), and `go` is not on PATH")
    GO_ROOT.mkdir(parents=True, exist_ok=True)
    with open(GO_ROOT / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary
        log(f"[livekit] building {SERVER_MODULE}@{version} with `go install` (once; minutes) into {binary.parent}")
        t0 = time.monotonic()
        logfile = GO_ROOT / f"build-{version}.log"
        with open(logfile, "w") as out:
            try:
                proc = subprocess.run([go, "install", f"{SERVER_MODULE}@{version}"], env=go_env(version), stdout=out,
                                      stderr=subprocess.STDOUT, timeout=timeout_s, cwd=GO_ROOT)
            except subprocess.TimeoutExpired:
                raise DevServerError(f"`go install {SERVER_MODULE}@{version}` did not finish in {timeout_s:.0f} s "
                                     f"(log: {logfile})") from None
        if proc.returncode != 0 or not binary.is_file():
            tail = logfile.read_text(errors="replace")[-2000:]
            raise DevServerError(f"`go install {SERVER_MODULE}@{version}` failed (exit {proc.returncode}); "
                                 f"log {logfile}:\n{tail}")
        log(f"[livekit] built {binary} in {time.monotonic() - t0:.0f} s")
    return binary


# ---- network namespace ----------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DevServerError(f"`{' '.join(cmd)}` failed: {exc}") from None
    if proc.returncode != 0:
        raise DevServerError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Namespaces of ours whose creating process is gone (a killed test run): deleted."""
    removed = []
    for path in Path("/run/netns").glob(NS_PREFIX + "*") if Path("/run/netns").is_dir() else []:
        try:
            pid = int(path.name[len(NS_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True, timeout=10)
            removed.append(path.name)
    return removed


class NetNamespace:
    """A network namespace with a veth pair inside it (see the module doc). Use as a context manager or call
    create() / delete()."""

    def __init__(self, subnet: str = "10.213.7", name: str | None = None):
        self.name = name or f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.server_ip = f"{subnet}.1"
        self.peer_ip = f"{subnet}.2"
        self._created = False
        self._saved: dict[int, int] = {}  # thread id -> fd of the namespace it came from
        self._lock = threading.Lock()

    def create(self) -> "NetNamespace":
        if os.geteuid() != 0:
            raise DevServerError("a network namespace for the LiveKit tests needs root (CI runs as root)")
        if shutil.which("ip") is None:
            raise DevServerError("`ip` (iproute2) is not installed: cannot make the test network namespace")
        remove_stale_namespaces()
        _run(["ip", "netns", "add", self.name])
        self._created = True
        try:
            ns = ["ip", "-n", self.name]
            _run(ns + ["link", "set", "lo", "up"])
            _run(ns + ["link", "add", "lk0", "type", "veth", "peer", "name", "lk1"])
            _run(ns + ["addr", "add", f"{self.server_ip}/24", "dev", "lk0"])
            _run(ns + ["addr", "add", f"{self.peer_ip}/24", "dev", "lk1"])
            _run(ns + ["link", "set", "lk0", "up"])
            _run(ns + ["link", "set", "lk1", "up"])
        except DevServerError:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        if self._created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
            self._created = False

    def __enter__(self) -> "NetNamespace":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.delete()

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def exec_prefix(self) -> list[str]:
        """Prefix for a command that must run inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def enter(self) -> None:
        """Move the calling thread into the namespace (remembering where it was)."""
        libc = ctypes.CDLL(None, use_errno=True)
        tid = threading.get_ident()
        with self._lock:
            if tid in self._saved:
                return
            back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    os.close(back)
                    raise DevServerError(f"setns({self.path}) failed: {os.strerror(err)}")
            finally:
                os.close(fd)
            self._saved[tid] = back

    def exit(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with self._lock:
            back = self._saved.pop(threading.get_ident(), None)
            if back is None:
                return
            try:
                if libc.setns(back, CLONE_NEWNET) != 0:
                    raise DevServerError(f"setns back failed: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(back)

    def inside(self) -> bool:
        """Whether the calling thread is in this namespace."""
        try:
            return os.stat("/proc/thread-self/ns/net").st_ino == os.stat(self.path).st_ino
        except OSError:
            return False


# ---- the server -----------------------------------------------------------------------------------------------
@dataclass
class ServerAddress:
    ip: str
    port: int
    api_key: str
    api_secret: str

    @property
    def ws_url(self) -> str:
        return f"ws://{self.ip}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.ip}:{self.port}"


class DevServer:
    """livekit-server in `ns` on `port` (signal/API), `port + 1` (RTC over TCP), `port + 2` (RTC over UDP)."""

    def __init__(self, ns: NetNamespace, binary: Path, port: int = 7880, workdir: Path | None = None,
                 log_level: str = "info"):
        self.ns = ns
        self.binary = binary
        self.port = port
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="livekit-server-"))
        self.log_level = log_level
        self.address = ServerAddress(ns.server_ip, port, API_KEY, secrets.token_hex(24))  # 48 characters
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"
        self.starts = 0

    def write_config(self) -> Path:
        a = self.address
        config = self.workdir / "livekit.yaml"
        config.write_text(
            f"port: {a.port}\n"
            f"bind_addresses:\n  - {a.ip}\n"
            "rtc:\n"
            f"  tcp_port: {a.port + 1}\n"
            f"  udp_port: {a.port + 2}\n"
            "  use_external_ip: false\n"
            f"  node_ip: {a.ip}\n"
            f"keys:\n  {a.api_key}: {a.api_secret}\n"
            f"logging:\n  level: {self.log_level}\n"
        )
        return config

    def start(self, timeout_s: float = 20.0) -> "DevServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        config = self.write_config()
        log = open(self.log_path, "a")
        log.write(f"\n===== start {self.starts} =====\n")
        log.flush()
        self.proc = subprocess.Popen(self.ns.exec_prefix() + [str(self.binary), "--config", str(config)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.starts += 1
        self._started_at = time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DevServerError(f"livekit-server exited with code {self.proc.returncode} right after start; "
                                     f"log {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise DevServerError(f"livekit-server did not answer GET / with OK within {timeout_s:.0f} s; "
                             f"log {self.log_path}:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """GET / answers OK (asked from inside the namespace, on a thread of our own)."""
        result: list[bool] = []

        def probe() -> None:
            self.ns.enter()
            try:
                with socket.create_connection((self.address.ip, self.address.port), timeout=1.0) as sock:
                    sock.sendall(f"GET / HTTP/1.0\r\nHost: {self.address.ip}\r\n\r\n".encode())
                    data = sock.recv(4096)
                result.append(data.startswith(b"HTTP/1.") and data.rstrip().endswith(b"OK"))
            except OSError:
                result.append(False)
            finally:
                self.ns.exit()

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(3.0)
        return bool(result and result[0])

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, wait, SIGTERM again (a SIGTERM in the first seconds after start can be lost), then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # `ip netns exec` execs the server, so the pid is the server's
        for sig in (signal.SIGTERM, signal.SIGTERM):
            try:
                proc.send_signal(sig)
                proc.wait(timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return
        proc.kill()
        proc.wait(timeout_s)

    def kill(self) -> None:
        """Crash it (SIGKILL): what a server failure looks like to the clients."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
