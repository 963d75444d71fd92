"""The blob store's staging area: files a killed upload left behind are swept at start-up."""

from __future__ import annotations

import os
import time

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
