"""The blob store's staging area: files a killed upload left behind are swept at start-up;
a finished file (a C-STORE's) is linked in when it can be, copied when not."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from server.store.blobs import BlobStore


def test_abandoned_staging_files_are_swept_and_live_ones_kept(tmp_path):
    store = BlobStore(tmp_path)
    abandoned = store.stage()
    abandoned.write(b"half an upload")
    old = time.time() - 7200
    os.utime(abandoned.path, (old, old))
    live = store.stage()
    live.write(b"an upload in progress")

    reopened = BlobStore(tmp_path)

    assert not abandoned.path.exists()
    assert live.path.exists()
    assert reopened.sweep_incoming() == 0
    live.discard()
    abandoned.discard()


def test_a_finished_file_is_linked_on_the_same_file_system_and_copied_across(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    content = os.urandom(300_000)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as other:
        # /dev/shm is a tmpfs, another file system than tmp_path (as a tmpfs /tmp would be)
        for source in (tmp_path / "received.dcm", Path(other) / "received.dcm"):
            source.write_bytes(content)
            staged = store.stage_file(source)
            linked = source.stat().st_dev == store.incoming.stat().st_dev
            assert (staged.path.stat().st_ino == source.stat().st_ino) is linked
            staged.seal()
            source.unlink()  # as pynetdicom does once the handler returns
            assert staged.size == len(content)
            assert staged.path.read_bytes() == content
            staged.discard()
            assert list(store.incoming.iterdir()) == []
