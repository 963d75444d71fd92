"""`kuroshio serve --workers N`: several processes on one port, one DIMSE AE, replacement
of a dead worker, and all of them ending with the server (SIGTERM or kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from server.store.mongod import _pid_alive, free_port
from tests.conftest import LiveServer, start_server, stop_server


def children(pid: int) -> set[int]:
    """The live worker processes of the server (spawned by multiprocessing)."""
    found = set()
    for entry in Path(f"/proc/{pid}/task").iterdir():
        for child in (entry / "children").read_text().split():
            try:
                if _pid_alive(int(child)) and b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.add(int(child))
            except OSError:  # ended meanwhile
                continue
    return found


def listeners(port: int) -> set[int]:
    """The pids holding a listening socket on `port` (each worker binds its own)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def echo(port: int) -> bool:
    ae = AE(ae_title="WORKERTEST")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title="KUROSHIO")
    if not association.is_established:
        return False
    status = association.send_c_echo()
    association.release()
    return status.Status == 0


@pytest.fixture()
def two_workers(mongod, tmp_path) -> Iterator[LiveServer]:
    live = start_server(mongod.uri, tmp_path, {"KUROSHIO_WORKERS": "2"})
    yield live
    stop_server(live)


def test_each_worker_listens_and_one_runs_the_dicom_ae(two_workers):
    port = int(two_workers.base_url.rsplit(":", 1)[1])
    workers = children(two_workers.process.pid)
    assert len(workers) == 2
    wait_for(lambda: listeners(port) == workers)
    assert len(listeners(two_workers.dicom_port)) == 1
    assert listeners(two_workers.dicom_port) <= workers
    assert echo(two_workers.dicom_port)
    with httpx.Client(base_url=two_workers.fhir) as client:  # fresh connections spread over both
        for _ in range(20):
            assert client.get("/metadata", headers={"Connection": "close"}).status_code == 200


def test_a_dead_worker_is_replaced_and_takes_over_the_dicom_port(two_workers):
    port = int(two_workers.base_url.rsplit(":", 1)[1])
    dimse_worker = next(iter(listeners(two_workers.dicom_port)))
    os.kill(dimse_worker, signal.SIGKILL)
    wait_for(lambda: len(children(two_workers.process.pid)) == 2 and dimse_worker not in children(two_workers.process.pid))
    wait_for(lambda: len(listeners(two_workers.dicom_port)) == 1 and len(listeners(port)) == 2)
    assert echo(two_workers.dicom_port)
    assert httpx.get(f"{two_workers.fhir}/metadata").status_code == 200


def test_workers_end_with_the_server_on_sigterm_and_on_kill_9(mongod, tmp_path):
    for how in (signal.SIGTERM, signal.SIGKILL):
        live = start_server(mongod.uri, tmp_path / how.name, {"KUROSHIO_WORKERS": "2"})
        workers = children(live.process.pid)
        assert len(workers) == 2
        live.process.send_signal(how)
        live.process.wait(30)
        wait_for(lambda: not any(_pid_alive(pid) for pid in workers), timeout=30)
        if how == signal.SIGTERM:
            assert live.process.returncode == 0


def test_a_worker_that_cannot_start_stops_the_server_with_an_error(mongod, tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    env = {**os.environ, "KUROSHIO_MONGODB_URI": mongod.uri, "KUROSHIO_WORKERS": "2", "KUROSHIO_PORT": str(free_port()),
           "KUROSHIO_DICOM_PORT": str(busy.getsockname()[1]), "KUROSHIO_DATA_DIR": str(tmp_path)}
    try:
        result = subprocess.run([sys.executable, "-m", "server.cli", "serve"], env=env, capture_output=True, timeout=120,
                                cwd=Path(__file__).resolve().parents[1])
    finally:
        busy.close()
    assert result.returncode == 1
    assert b"failed to start" in result.stderr


def test_one_worker_is_one_process_serving_everything(mongod, tmp_path):
    live = start_server(mongod.uri, tmp_path, {"KUROSHIO_WORKERS": "1"})
    try:
        port = int(live.base_url.rsplit(":", 1)[1])
        assert children(live.process.pid) == set()
        assert listeners(port) == listeners(live.dicom_port) == {live.process.pid}
        assert echo(live.dicom_port)
    finally:
        stop_server(live)


def test_workers_still_starting_end_with_a_server_killed_at_once(mongod, tmp_path):
    """A kill -9 of the server while its workers are still importing: they must not live
    on as orphans (the parent-death signal is armed only once a worker runs its code)."""
    env = {**os.environ, "KUROSHIO_MONGODB_URI": mongod.uri, "KUROSHIO_WORKERS": "2", "KUROSHIO_PORT": str(free_port()),
           "KUROSHIO_DICOM_PORT": str(free_port()), "KUROSHIO_DATA_DIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=Path(__file__).resolve().parents[1],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(children(process.pid)) == 2, timeout=60)
        workers = children(process.pid)
    finally:
        process.kill()
        process.wait()
    wait_for(lambda: not any(_pid_alive(pid) for pid in workers), timeout=30)
