"""pytest plugin: a real local Argilla 2.8 server for the tests (no mocks).

Loaded from tests/conftest.py with `pytest_plugins = ["tests.argilla_fixtures"]`.

`argilla_server` (session scope) starts the server with services/argilla/ctl.py
in a temporary home on a free port (Redis on another free port, osmem on a
third), yields an `ArgillaServer` (url, api_key, ...) and stops everything at
the end of the session; a session killed before its teardown takes the server
down with it (`--exit-with` the pytest process). It fails, with the command to run, when the server venv
or redis-server is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CTL = REPO / "services" / "argilla" / "ctl.py"
SERVER_VENV = REPO / ".venv-argilla"
START_TIMEOUT_S = 300  # generous: a loaded 2-core machine can take minutes to import the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctl(*args: str, timeout: float = START_TIMEOUT_S + 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CTL), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class ArgillaServer:
    url: str
    api_key: str
    home: Path
    port: int
    owner: str
    owner_password: str

    def client(self):
        """A fresh SDK client logged in as the owner."""
        from align.argilla_io import connect

        return connect(self.url, self.api_key)

    def start(self) -> dict:
        done = _ctl(
            "start", "--home", str(self.home), "--port", str(self.port), "--timeout", str(START_TIMEOUT_S),
            "--exit-with", str(os.getpid()), "--json",
        )
        if done.returncode != 0:
            pytest.fail(f"Argilla server did not start:\n{done.stderr}{done.stdout}", pytrace=False)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        _ctl("stop", "--home", str(self.home), timeout=120)

    def restart(self) -> dict:
        self.stop()
        return self.start()


@pytest.fixture(scope="session")
def argilla_server(tmp_path_factory) -> ArgillaServer:
    if not (SERVER_VENV / "bin" / "python").exists():
        pytest.fail(f"{SERVER_VENV} is missing: run `make argilla-deps` first", pytrace=False)
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.fail("redis-server is missing: run `make argilla-deps` (Debian package redis-server)", pytrace=False)
    home = tmp_path_factory.mktemp("argilla-home")
    server = ArgillaServer(url="", api_key="", home=home, port=_free_port(), owner="", owner_password="")
    info = server.start()
    try:
        creds = json.loads((home / "credentials.json").read_text())
        server.url, server.api_key = info["url"], creds["api_key"]
        server.owner, server.owner_password = creds["username"], creds["password"]
        yield server
    finally:
        server.stop()


@pytest.fixture
def unique_name():
    """A dataset/workspace name no other test uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_no_secrets(folder: Path, *secrets: str, texts: tuple[str, ...] = ()) -> None:
    """No secret (API key, password) in any file under `folder` (logs, manifest, config.yaml,
    TensorBoard events: read as bytes, binary files too) nor in `texts` (a stage's console)."""
    assert all(len(secret) >= 8 for secret in secrets), "a secret this short would match by chance"
    checked = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            checked += 1
            for secret in secrets:
                assert secret.encode() not in content, f"{path} holds a secret"
    assert checked > 0, f"nothing under {folder}"
    for text in texts:
        for secret in secrets:
            assert secret not in text, "the console output holds a secret"
