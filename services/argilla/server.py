"""Launch a local Argilla 2.8 server (runs in .venv-argilla; started by ctl.py).

    server.py serve --home DIR --host H --port P --redis-url URL
    server.py worker            (the background-job worker; started by `serve`)

`serve` does, in order:
1. starts osmem-server (in-memory OpenSearch-compatible search engine) as a
   child that exits with this process (`--parent-pid` and its stdin pipe);
2. configures argilla_server through its ARGILLA_* environment variables
   (SQLite under DIR/server, Redis at URL, search engine "osmem": the
   read-modify-write subclass in osmem_engine.py);
3. migrates the database, makes sure the owner user from DIR/credentials.json
   exists with those credentials;
4. rebuilds the search index from the database (osmem keeps nothing on disk);
5. starts one background-job worker (rq, as `argilla_server worker` would)
   and serves `argilla_server:app` with uvicorn until SIGTERM/SIGINT, or
   until the process given by --exit-with is gone (then it stops Redis too).

Steps 3-5 call argilla_server's own CLI functions directly: `python -m
argilla_server` crashes with click 8.5 (its typer 0.9 pin).
PIDs of the children are written to DIR/run/{osmem,worker}.pid.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this process dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_osmem(run_dir: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    from osmem_server import resolve_binary

    args = [resolve_binary(), "--parent-pid", str(os.getpid()), "--addr", "127.0.0.1:0", "--no-ja"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready: dict = {}

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and "url" in msg:
                ready.update(msg)
                break
        for _ in proc.stdout:  # keep draining so osmem never blocks on a full pipe
            pass

    threading.Thread(target=reader, daemon=True).start()
    waited = 0.0
    while not ready and proc.poll() is None and waited < timeout:
        time.sleep(0.1)
        waited += 0.1
    if not ready:
        proc.kill()
        raise SystemExit(f"osmem-server did not start within {timeout:.0f} s")
    (run_dir / "osmem.pid").write_text(str(proc.pid))
    return proc, ready["url"]


def configure_env(home: Path, redis_url: str, search_url: str) -> None:
    os.environ.update(
        {
            "ARGILLA_HOME_PATH": str(home / "server"),
            "ARGILLA_REDIS_URL": redis_url,
            "ARGILLA_SEARCH_ENGINE": "osmem",
            "ARGILLA_ELASTICSEARCH": search_url,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )


def migrate() -> None:
    from argilla_server.cli.database.migrate import migrate_db

    migrate_db(revision="head")


async def ensure_owner(credentials: dict) -> None:
    """The owner from credentials.json exists, with that API key and password."""
    from argilla_server.cli.database.users.create_default import _create_default
    from argilla_server.contexts import accounts
    from argilla_server.database import AsyncSessionLocal

    username = credentials["username"]
    async with AsyncSessionLocal() as db:
        user = await accounts.get_user_by_username(db, username)
        if user is None:
            if username != "argilla":
                raise SystemExit("credentials.json: only the default owner 'argilla' can be created")
            await _create_default(api_key=credentials["api_key"], password=credentials["password"], quiet=True)
            return
        if user.api_key != credentials["api_key"] or not accounts.verify_password(
            credentials["password"], user.password_hash
        ):
            # credentials.json was replaced or lost and regenerated: the file wins.
            user.api_key = credentials["api_key"]
            user.password_hash = accounts.hash_password(credentials["password"])
            await db.commit()


async def reindex() -> int:
    """Rebuild the search index of every published dataset from the database.

    Uses argilla_server's own Reindexer (what `argilla_server search-engine
    reindex` runs), restricted to published datasets: drafts have no index yet
    and get one when they are published.
    """
    from sqlalchemy import select

    from argilla_server.cli.search_engine.reindex import Reindexer
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.enums import DatasetStatus
    from argilla_server.models import Dataset
    from argilla_server.search_engine import get_search_engine

    count = 0
    async with AsyncSessionLocal() as db:
        ids = (await db.execute(select(Dataset.id).filter_by(status=DatasetStatus.ready))).scalars().all()
        async for engine in get_search_engine():
            for dataset_id in ids:
                dataset = await Reindexer.reindex_dataset(db, engine, dataset_id)
                async for records in Reindexer.reindex_dataset_records(db, engine, dataset):
                    count += len(records)
    return count


def start_worker(home: Path) -> subprocess.Popen:
    log = open(home / "logs" / "worker.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "worker"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    (home / "run" / "worker.pid").write_text(str(proc.pid))
    return proc


def worker() -> None:
    """One rq worker on Argilla's queues (what `argilla_server worker` starts, without the fork pool)."""
    import_engine()
    from rq import SimpleWorker

    from argilla_server.jobs.queues import DEFAULT_QUEUE, HIGH_QUEUE, REDIS_CONNECTION

    SimpleWorker([HIGH_QUEUE, DEFAULT_QUEUE], connection=REDIS_CONNECTION).work(with_scheduler=False)


def import_engine() -> None:
    sys.path.insert(0, str(HERE))
    import osmem_engine  # noqa: F401  (registers the "osmem" engine)


def watch_owner(pid: int) -> None:
    """Shut down (as on SIGTERM) once process `pid` is gone: a test session killed
    before its teardown must not leave a server behind."""

    def loop() -> None:
        while True:
            time.sleep(2)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass

    threading.Thread(target=loop, daemon=True).start()


def stop_redis(run_dir: Path) -> None:
    """Stop the Redis that ctl.py started for this home (used when the owner process died)."""
    try:
        pid = int((run_dir / "redis.pid").read_text())
        if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pass


def serve(args: argparse.Namespace) -> None:
    home = Path(args.home).resolve()
    run_dir = home / "run"
    for sub in ("server", "run", "logs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    credentials = json.loads((home / "credentials.json").read_text())

    osmem, search_url = start_osmem(run_dir)
    configure_env(home, args.redis_url, search_url)
    print(f"osmem-server at {search_url}", flush=True)

    import_engine()
    migrate()
    asyncio.run(ensure_owner(credentials))
    n = asyncio.run(reindex())
    print(f"search index rebuilt: {n} records", flush=True)

    worker_proc = start_worker(home)
    if args.exit_with:
        watch_owner(args.exit_with)
    import uvicorn

    # uvicorn re-raises the SIGTERM it shut down on once it is done; with the default
    # handler that would end the process before the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run("argilla_server:app", host=args.host, port=args.port, access_log=False, log_level="warning")
    finally:
        print("shutting down", flush=True)
        for child in (worker_proc, osmem):
            if child.poll() is None:
                child.terminate()
        for child in (worker_proc, osmem):
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        for name in ("worker.pid", "osmem.pid"):
            (run_dir / name).unlink(missing_ok=True)
        if args.exit_with and not _exists(args.exit_with):
            stop_redis(run_dir)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--home", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6900)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--exit-with", type=int, default=0, help="shut down when this process id is gone")
    sub.add_parser("worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.cmd == "serve":
        serve(args)
    else:
        worker()


if __name__ == "__main__":
    main()
