"""Start, stop and inspect the local Argilla server (standard library only).

    python services/argilla/ctl.py start  [--home .argilla] [--port 6900] [--host 127.0.0.1]
    python services/argilla/ctl.py stop   [--home .argilla]
    python services/argilla/ctl.py status [--home .argilla]

Used by `make argilla` / `make argilla-stop` and by the pytest fixture in
tests/argilla_fixtures.py (tmp home, free port). Any Python 3.9+ can run it;
the server itself runs in the venv given by --venv (default .venv-argilla).

What `start` starts, each with a PID file under HOME/run/:
- redis-server (Debian's), on a free port, data in HOME/redis/;
- services/argilla/server.py in the server venv, which starts osmem-server and
  one job worker as its children (PID files osmem.pid, worker.pid) and serves
  Argilla with SQLite under HOME/server/.
Starting twice is harmless: a running, healthy server is reported, not restarted.
The owner's credentials live in HOME/credentials.json (mode 600), made on the
first start: username `argilla`, a generated password and API key.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_HOME = REPO / ".argilla"
DEFAULT_VENV = REPO / ".venv-argilla"
OWNER = "argilla"

# name -> a string its /proc/PID/cmdline must contain (guards against reused PIDs)
PROCESSES = {"server": "server.py", "worker": "server.py", "osmem": "osmem-server", "redis": "redis-server"}
STOP_ORDER = ["server", "worker", "osmem", "redis"]


class CtlError(RuntimeError):
    pass


# ---------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _read_pid(run_dir: Path, name: str) -> int | None:
    try:
        return int((run_dir / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None, marker: str) -> bool:
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return marker in cmdline and state != "Z"


def _credentials(home: Path) -> dict:
    path = home / "credentials.json"
    if path.exists():
        return json.loads(path.read_text())
    creds = {"username": OWNER, "password": secrets.token_urlsafe(12), "api_key": secrets.token_urlsafe(32)}
    _write_credentials(home, creds)
    return creds


def _write_credentials(home: Path, creds: dict) -> None:
    path = home / "credentials.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _state(home: Path) -> dict:
    try:
        return json.loads((home / "run" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def health(url: str, api_key: str, timeout: float = 5.0) -> bool:
    req = urllib.request.Request(f"{url}/api/v1/status", headers={"X-Argilla-Api-Key": api_key})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _locked(home: Path):
    (home / "run").mkdir(parents=True, exist_ok=True)
    with open(home / "run" / "ctl.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _spawn(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )


# ---------------------------------------------------------------- commands


def status(home: Path) -> dict:
    """What runs now: {"running": bool, "url": str|None, "processes": {name: pid|None}}."""
    run_dir = home / "run"
    procs = {}
    for name, marker in PROCESSES.items():
        pid = _read_pid(run_dir, name)
        procs[name] = pid if _alive(pid, marker) else None
    state = _state(home)
    url = state.get("url")
    running = False
    if procs["server"] and url and (home / "credentials.json").exists():
        running = health(url, _credentials(home)["api_key"])
    return {"running": running, "url": url if procs["server"] else None, "processes": procs}


def start(home: Path, host: str, port: int, venv: Path, timeout: float, exit_with: int = 0) -> dict:
    home = home.resolve()
    for sub in ("server", "redis", "run", "logs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    with _locked(home):
        st = status(home)
        if st["running"]:
            return {"url": st["url"], "already_running": True}
        if any(st["processes"].values()):  # leftovers of a crashed start: clean up first
            _stop_processes(home)

        python = venv / "bin" / "python"
        if not python.exists():
            raise CtlError(f"{venv} is missing: run `make argilla-deps` first")
        redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(redis_bin).exists():
            raise CtlError("redis-server is not installed: run `make argilla-deps` (apt-get install redis-server)")
        if port_in_use(host, port):
            raise CtlError(f"port {port} on {host} is already in use (choose another with ARGILLA_PORT=...)")
        creds = _credentials(home)
        run_dir, logs = home / "run", home / "logs"

        redis_port = free_port()
        redis = _spawn(
            [
                redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(home / "redis"),
                "--dbfilename", "dump.rdb", "--save", "60 1", "--appendonly", "no", "--daemonize", "no",
                "--protected-mode", "yes", "--loglevel", "warning",
            ],
            logs / "redis.log",
        )
        (run_dir / "redis.pid").write_text(str(redis.pid))

        url = f"http://{host}:{port}"
        if creds.get("api_url") != url:
            creds["api_url"] = url
            _write_credentials(home, creds)
        server = _spawn(
            [
                str(python), str(HERE / "server.py"), "serve", "--home", str(home), "--host", host,
                "--port", str(port), "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
                "--exit-with", str(exit_with),
            ],
            logs / "server.log",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        (run_dir / "server.pid").write_text(str(server.pid))
        (run_dir / "state.json").write_text(json.dumps({"url": url, "port": port, "redis_port": redis_port}))

        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            if server.poll() is not None or redis.poll() is not None:
                which, log = ("server", "server.log") if server.poll() is not None else ("redis", "redis.log")
                _stop_processes(home)
                raise CtlError(f"{which} exited during start; last lines of {logs / log}:\n{_tail(logs / log)}")
            if health(url, creds["api_key"]):
                break
            if time.monotonic() > deadline:
                _stop_processes(home)
                raise CtlError(
                    f"Argilla did not answer within {timeout:.0f} s; last lines of {logs / 'server.log'}:\n"
                    + _tail(logs / "server.log")
                )
            time.sleep(0.5)
        return {"url": url, "already_running": False, "seconds": round(time.monotonic() - t0, 1)}


def _stop_processes(home: Path, grace: float = 20.0) -> list[str]:
    run_dir = home / "run"
    stopped = []
    for name in STOP_ORDER:
        pid = _read_pid(run_dir, name)
        if _alive(pid, PROCESSES[name]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _alive(pid, PROCESSES[name]) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid, PROCESSES[name]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stopped.append(name)
        (run_dir / f"{name}.pid").unlink(missing_ok=True)
    return stopped


def stop(home: Path) -> list[str]:
    home = home.resolve()
    if not (home / "run").exists():
        return []
    with _locked(home):
        stopped = _stop_processes(home)
        (home / "run" / "state.json").unlink(missing_ok=True)
        return stopped


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Control the local Argilla server.")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("ARGILLA_LOCAL_HOME", DEFAULT_HOME)))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("ARGILLA_PORT", 6900)))
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to answer")
    parser.add_argument("--json", action="store_true", help="print one JSON line (no credentials in it)")
    parser.add_argument("--exit-with", type=int, default=0, metavar="PID",
                        help="start: the server stops itself (and Redis) once this process is gone")
    args = parser.parse_args(argv)
    home = args.home.resolve()

    try:
        if args.command == "start":
            info = start(home, args.host, args.port, args.venv, args.timeout, args.exit_with)
            creds = _credentials(home)
            if args.json:
                print(json.dumps({**info, "credentials_file": str(home / "credentials.json")}))
            else:
                how = "already running" if info["already_running"] else f"started in {info['seconds']} s"
                print(f"Argilla {how}: {info['url']}")
                print(f"  sign in as {creds['username']!r} with password {creds['password']!r}")
                print(f"  API key and password are in {home / 'credentials.json'} (mode 600);")
                print("  align.argilla_io.connect() reads it when ARGILLA_API_URL/ARGILLA_API_KEY are unset")
                print(f"  logs: {home / 'logs'}/   stop: make argilla-stop")
            return 0
        if args.command == "stop":
            stopped = stop(home)
            if args.json:
                print(json.dumps({"stopped": stopped}))
            else:
                print("stopped: " + ", ".join(stopped) if stopped else "Argilla was not running")
            return 0
        st = status(home)
        if args.json:
            print(json.dumps(st))
        elif st["running"]:
            print(f"Argilla running: {st['url']}")
        else:
            print("Argilla is not running" + (f" (leftover processes: {st['processes']})" if any(st["processes"].values()) else ""))
        return 0 if st["running"] else 3
    except CtlError as e:
        print(f"argilla: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
