"""`kuroshio serve --workers N`: several processes on one port, each connection handed to
the least busy, one DIMSE AE, replacement of a dead worker, and all of them ending with
the server (SIGTERM or kill -9)."""

from __future__ import annotations

import http.client
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


def socket_owners(local_port: int, state: str, remote_port: int | None = None) -> set[int]:
    """The pids holding a TCP socket on `local_port` in `state` (0A: listening, 01:
    established), of a connection from `remote_port` if given."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if (fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == local_port
                    and (remote_port is None or int(fields[2].rsplit(":", 1)[1], 16) == remote_port)):
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


def listeners(port: int) -> set[int]:
    return socket_owners(port, "0A")


def serving_worker(port: int, connection: http.client.HTTPConnection) -> int:
    """The pid that holds the server's end of `connection` (after one request on it)."""
    connection.request("GET", "/fhir/metadata")
    response = connection.getresponse()
    response.read()
    assert response.status == 200
    (pid,) = socket_owners(port, "01", connection.sock.getsockname()[1])
    return pid


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


def both_serve(server: LiveServer) -> bool:
    """Two connections opened at once go one to each worker, and both are answered."""
    port = int(server.base_url.rsplit(":", 1)[1])
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(2)]
    try:
        return {serving_worker(port, c) for c in connections} == children(server.process.pid)
    finally:
        for connection in connections:
            connection.close()


@pytest.fixture()
def two_workers(mongod, tmp_path) -> Iterator[LiveServer]:
    """A server whose two workers have both started: the supervisor accepts connections
    as soon as the first is ready, and hands them all to it until the second is."""
    live = start_server(mongod.uri, tmp_path, {"KUROSHIO_WORKERS": "2"})
    wait_for(lambda: both_serve(live))
    time.sleep(0.5)  # the workers' reports of those connections' closes
    yield live
    stop_server(live)


def test_the_server_listens_and_one_worker_runs_the_dicom_ae(two_workers):
    port = int(two_workers.base_url.rsplit(":", 1)[1])
    workers = children(two_workers.process.pid)
    assert len(workers) == 2
    assert listeners(port) == {two_workers.process.pid}
    assert len(listeners(two_workers.dicom_port)) == 1
    assert listeners(two_workers.dicom_port) <= workers
    assert echo(two_workers.dicom_port)


def test_each_connection_goes_to_the_worker_with_the_fewest_open(two_workers):
    """Keep-alive connections opened at once spread evenly, and a worker whose connections
    closed gets the next ones (least connections, not a hash of the addresses)."""
    port = int(two_workers.base_url.rsplit(":", 1)[1])
    workers = children(two_workers.process.pid)
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(8)]
    try:
        served = [serving_worker(port, c) for c in connections]
        assert {pid: served.count(pid) for pid in workers} == {pid: 4 for pid in workers}
        first = served[0]
        closing = [c for c, pid in zip(connections, served) if pid == first]
        client_ports = [c.sock.getsockname()[1] for c in closing]
        for connection in closing:
            connection.close()
        wait_for(lambda: not any(socket_owners(port, "01", p) for p in client_ports))
        time.sleep(0.5)  # the worker's report of the closes
        newer = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(4)]
        connections += newer
        assert [serving_worker(port, c) for c in newer] == [first] * 4
    finally:
        for connection in connections:
            connection.close()
    with httpx.Client(base_url=two_workers.fhir) as client:  # one connection a request
        for _ in range(20):
            assert client.get("/metadata", headers={"Connection": "close"}).status_code == 200


def test_a_dead_worker_is_replaced_and_takes_over_the_dicom_port(two_workers):
    dimse_worker = next(iter(listeners(two_workers.dicom_port)))
    os.kill(dimse_worker, signal.SIGKILL)
    wait_for(lambda: len(children(two_workers.process.pid)) == 2 and dimse_worker not in children(two_workers.process.pid))
    wait_for(lambda: len(listeners(two_workers.dicom_port)) == 1)
    assert echo(two_workers.dicom_port)
    wait_for(lambda: both_serve(two_workers))


def test_a_replacement_that_cannot_start_is_retried_while_the_other_worker_serves(two_workers):
    """A replacement failing its start-up (here: the DICOM port taken meanwhile; in
    production, MongoDB briefly unreachable) does not stop the server: the other worker
    serves, and the replacement is started again until it succeeds."""
    import socket

    dimse_worker = next(iter(listeners(two_workers.dicom_port)))
    other = (children(two_workers.process.pid) - {dimse_worker}).pop()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    two_workers.process.send_signal(signal.SIGSTOP)  # no replacement until the port is taken
    try:
        os.kill(dimse_worker, signal.SIGKILL)

        def take_port() -> bool:
            try:
                squatter.bind(("127.0.0.1", two_workers.dicom_port))
            except OSError:  # the dead worker's socket is still being closed
                return False
            return True

        wait_for(take_port, timeout=30)
        squatter.listen(1)
    finally:
        two_workers.process.send_signal(signal.SIGCONT)
    try:
        # two failed starts: each is a chance for the supervisor to mishandle a worker's end
        wait_for(lambda: two_workers.log_path.read_bytes().count(b"failed to start; trying again") >= 2, timeout=120)
        assert two_workers.process.poll() is None
        assert _pid_alive(other)
        assert httpx.get(f"{two_workers.fhir}/metadata", timeout=30).status_code == 200
    finally:
        squatter.close()
    wait_for(lambda: len(listeners(two_workers.dicom_port)) == 1, timeout=120)
    assert echo(two_workers.dicom_port)


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


def serve_with_a_port_taken(mongod_uri: str, data_dir: Path, which: str) -> subprocess.CompletedProcess[bytes]:
    """Run `kuroshio serve` with two workers while another program listens on its HTTP
    or DICOM port (`which`), until it exits."""
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    ports = {"KUROSHIO_PORT": str(free_port()), "KUROSHIO_DICOM_PORT": str(free_port())}
    ports[which] = str(busy.getsockname()[1])
    env = {**os.environ, "KUROSHIO_MONGODB_URI": mongod_uri, "KUROSHIO_WORKERS": "2", "KUROSHIO_DATA_DIR": str(data_dir), **ports}
    try:
        return subprocess.run([sys.executable, "-m", "server.cli", "serve"], env=env, capture_output=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
    finally:
        busy.close()


def test_a_worker_that_cannot_start_stops_the_server_with_an_error(mongod, tmp_path):
    result = serve_with_a_port_taken(mongod.uri, tmp_path, "KUROSHIO_DICOM_PORT")
    assert result.returncode == 1
    assert b"failed to start" in result.stderr


def test_a_port_in_use_is_reported_at_once(mongod, tmp_path):
    result = serve_with_a_port_taken(mongod.uri, tmp_path, "KUROSHIO_PORT")
    assert result.returncode == 1
    assert b"Cannot listen on 127.0.0.1 port" in result.stdout + result.stderr


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
