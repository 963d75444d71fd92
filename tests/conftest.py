"""Shared fixtures: one real mongod and one real `kuroshio serve` per test session.

The mongod is the embedded launcher's (never a mock); the server is a separate process
reached over real HTTP, started with KUROSHIO_MONGODB_URI pointing at that mongod, so a
test can also look straight into the collections to check what was (not) written.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pymongo import MongoClient

from server.store.mongod import EmbeddedMongod, free_port

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = Path(os.environ.get("KUROSHIO_TEST_PACKAGES", ROOT / ".cache" / "packages"))
DATABASE = "kuroshio_test"


def package_dir(name: str) -> Path:
    """An unpacked npm package fetched by scripts/test."""
    path = PACKAGES / name / "package"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: run the tests with scripts/test, which fetches {name}")
    return path


@pytest.fixture(scope="session")
def mongod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMongod]:
    # 1 GB: the 20 MB Bundle-dataelements example is one transaction, which a 0.5 GB cache
    # already dirty from earlier tests refused as too large for the cache on a busy machine
    with EmbeddedMongod(tmp_path_factory.mktemp("mongod"), cache_size_gb=1.0) as instance:
        yield instance


@pytest.fixture(scope="session")
def db(mongod: EmbeddedMongod) -> Iterator[object]:
    client: MongoClient = MongoClient(mongod.uri)
    yield client[DATABASE]
    client.close()


@dataclass
class LiveServer:
    base_url: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    dicom_port: int

    @property
    def fhir(self) -> str:
        return f"{self.base_url}/fhir"


def start_server(mongod_uri: str, data_dir: Path, extra_env: dict[str, str] | None = None) -> LiveServer:
    port, dicom_port = free_port(), free_port()
    log_path = data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "KUROSHIO_MONGODB_URI": mongod_uri,
        "KUROSHIO_MONGODB_DATABASE": DATABASE,
        "KUROSHIO_PORT": str(port),
        "KUROSHIO_DICOM_PORT": str(dicom_port),
        "KUROSHIO_DATA_DIR": str(data_dir),
        **(extra_env or {}),
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/fhir/metadata", timeout=2).status_code == 200:
                # one worker may answer HTTP before the one running the DIMSE AE listens
                socket.create_connection(("127.0.0.1", dicom_port), timeout=2).close()
                return LiveServer(base_url, process, data_dir, log_path, dicom_port)
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not start: {log_path.read_text()[-3000:]}")


def stop_server(server: LiveServer) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def server(mongod: EmbeddedMongod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(mongod.local_uri, tmp_path_factory.mktemp("server"))  # as `kuroshio serve` does
    yield live
    stop_server(live)


@pytest.fixture()
def fhir(server: LiveServer) -> Iterator[httpx.Client]:
    """An HTTP client whose relative URLs are under /fhir/."""
    with httpx.Client(base_url=server.fhir + "/", timeout=60, headers={"Accept": "application/fhir+json"}) as client:
        yield client



