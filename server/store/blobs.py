"""The blob store: where the bytes of DICOM instances live.

Local files under `<data-dir>/dicom`, laid out by validated UIDs as
`<study>/<series>/<sop>.<digest>.dcm`. The digest (SHA-256 of the data set, its first
32 hex digits; blobs written by builds before 2026-11-23 have a 16-digit BLAKE2b one, see
`same_content`) makes the name content-addressed: two writers of the same bytes meet at
the same file (a hard link that already exists is the same content), writers of different
bytes for one SOP Instance UID never overwrite each other, and the index alone decides
which one is the instance. A crash between the blob and the index leaves an unreferenced file, never a
reference to a missing or half-written one.

Writing goes through a staging file in `<root>/.incoming` (same file system): it is
fsynced, validated by the caller, then hard-linked into place and the directory fsynced,
so a blob that the index points to is always complete and durable. Reads are byte ranges,
so a frame of a multi-gigabyte slide is one `pread`, never a parse.

Callers name blobs by `BlobKey`; "where the bytes live" stays a detail of this module, so
an object-store implementation can replace it behind the same methods.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# PS3.5 9.1: components of digits without leading zeros, separated by dots, <= 64 chars.
UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
CHUNK = 4 * 1024 * 1024
DIGEST = re.compile(r"[0-9a-f]{32}|[0-9a-f]{16}")  # SHA-256 (128 bits) | earlier builds' BLAKE2b (64 bits)


def is_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and UID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class BlobKey:
    """The name of one stored instance's bytes: UIDs checked, digest of the content."""

    study: str
    series: str
    sop: str
    digest: str

    def __post_init__(self) -> None:
        for uid in (self.study, self.series, self.sop):
            if not is_uid(uid):
                raise ValueError(f"{uid!r} is not a valid UID")
        if not DIGEST.fullmatch(self.digest):
            raise ValueError(f"{self.digest!r} is not a blob digest")

    @property
    def relative(self) -> str:
        return f"{self.study}/{self.series}/{self.sop}.{self.digest}.dcm"

    @classmethod
    def parse(cls, relative: str) -> BlobKey:
        study, series, name = relative.split("/")
        sop, digest, _ = name.rsplit(".", 2)
        return cls(study, series, sop, digest)


class StagedFile:
    """Bytes being received, in a private staging file; `seal()` makes them durable."""

    def __init__(self, path: Path, linked_from: Path | None = None) -> None:
        self.path = path
        self.size = 0
        if linked_from is not None:  # a complete file, written by someone else, not yet fsynced
            os.link(linked_from, path)
            try:
                self._fd: int | None = os.open(path, os.O_WRONLY)
            except OSError:
                path.unlink()
                raise
            self.size = os.fstat(self._fd).st_size
            return
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)

    def write_file(self, path: Path) -> None:
        """Append the bytes of a whole file, a chunk at a time."""
        with open(path, "rb", buffering=0) as source:
            while chunk := source.read(CHUNK):
                self.write(chunk)

    def seal(self) -> None:
        """fsync and close: after this the staged bytes survive a crash."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def digest(self, start: int) -> str:
        """The content digest of the staged bytes from `start` (the data set, so that the
        same instance in a different file meta header is the same content). SHA-256:
        collision resistant, and with the CPU's SHA extensions three times faster than
        the BLAKE2b it replaced (1.5 GB/s against 0.5 here)."""
        return _digest(self.path, start, hashlib.sha256())[:32]

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


def _digest(path: Path, start: int, content: hashlib._Hash) -> str:
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        while chunk := handle.read(CHUNK):
            content.update(chunk)
    return content.hexdigest()


ABANDONED_AFTER = 3600.0  # seconds without a write: the upload's process is gone


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.sweep_incoming()

    def sweep_incoming(self, older_than: float = ABANDONED_AFTER) -> int:
        """Remove staging files a killed process left behind; return how many.

        Only staging files: a placed blob without an index entry may be about to be
        indexed by a writer of the same bytes, so it is never swept. A staging file is
        written to until it is placed, so one untouched for an hour is abandoned.
        """
        removed = 0
        cutoff = time.time() - older_than
        for entry in os.scandir(self.incoming):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # placed or discarded meanwhile
                continue
        return removed

    def stage(self) -> StagedFile:
        return StagedFile(self.incoming / uuid.uuid4().hex)

    def stage_file(self, path: Path) -> StagedFile:
        """Stage the bytes of a whole file that its writer has finished (the PS3.10 file
        pynetdicom writes a C-STORE's data set into): hard-linked when it is on this file
        system, so half a megabyte is not copied per instance; copied otherwise."""
        try:
            return StagedFile(self.incoming / uuid.uuid4().hex, linked_from=path)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
        staged = self.stage()
        try:
            staged.write_file(path)
        except BaseException:
            staged.discard()
            raise
        return staged

    def path(self, key: BlobKey) -> Path:
        return self.root / key.relative

    def place(self, staged: StagedFile, key: BlobKey) -> set[Path]:
        """Link a sealed staging file into the layout (idempotent for the same content).

        Returns the directories whose entries changed; the link is durable once `sync`
        has flushed them (a batch syncs each directory once, not once per instance).
        """
        target = self.path(key)
        created = _makedirs(target.parent, self.root)
        try:
            os.link(staged.path, target)
        except FileExistsError:
            pass  # the same name is the same content (content-addressed)
        return {target.parent} | {directory.parent for directory in created}

    @staticmethod
    def sync(directories: set[Path]) -> None:
        """fsync directories (deepest first) so that placed links survive a crash."""
        for directory in sorted(directories, key=lambda d: -len(d.parts)):
            _fsync_dir(directory)

    def read_range(self, key: BlobKey, offset: int, length: int) -> bytes:
        with open(self.path(key), "rb", buffering=0) as handle:
            data = os.pread(handle.fileno(), length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"blob {key.relative} is shorter than its index says")
        return data

    def read(self, key: BlobKey) -> bytes:
        return self.path(key).read_bytes()

    def chunks(self, key: BlobKey, chunk: int = CHUNK) -> Iterator[bytes]:
        """The blob's bytes in order, `chunk` bytes at a time (never all in memory)."""
        with open(self.path(key), "rb", buffering=0) as handle:
            fd = handle.fileno()
            offset = 0
            while True:
                data = os.pread(fd, chunk, offset)
                if not data:
                    return
                offset += len(data)
                yield data

    def size(self, key: BlobKey) -> int:
        return self.path(key).stat().st_size

    def exists(self, key: BlobKey) -> bool:
        return self.path(key).is_file()

    def same_content(self, stored: BlobKey, placed: BlobKey, start: int) -> bool:
        """Whether a blob named by the earlier digest holds the data set just placed under
        `placed`: a byte-identical resend of an instance stored by an earlier build is the same
        instance, not different content under the same SOP Instance UID."""
        if len(stored.digest) != 16:
            return False
        return _digest(self.path(placed), start, hashlib.blake2b(digest_size=8)) == stored.digest

    def remove(self, key: BlobKey) -> None:
        """Unlink a blob and the directories it leaves empty."""
        target = self.path(key)
        target.unlink(missing_ok=True)
        for directory in (target.parent, target.parent.parent):
            try:
                directory.rmdir()
            except OSError:
                break


def _makedirs(directory: Path, root: Path) -> list[Path]:
    """Create `directory` and missing parents below `root`; return the new ones."""
    created: list[Path] = []
    current = directory
    while current != root and not current.is_dir():
        created.append(current)
        current = current.parent
    for path in reversed(created):
        try:
            path.mkdir()
        except FileExistsError:
            pass
    return created


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
