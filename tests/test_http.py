"""The HTTP server itself: how long it keeps an idle connection, what its start-up leaves
to the garbage collector."""

from __future__ import annotations

import asyncio
import gc
import http.client
import time
from pathlib import Path

from server.app import create_app
from server.config import Settings
from server.store.mongod import EmbeddedMongod
from terminology.builtin import ucum_parser, ucum_registry
from tests.conftest import LiveServer


def test_an_idle_connection_outlives_uvicorns_five_second_default(server: LiveServer) -> None:
    """A client reusing its connection after a pause must not race the server's close of it
    (the request would fail with no response): idle connections stay open for
    `KUROSHIO_KEEP_ALIVE_SECONDS` (75 s), not uvicorn's 5 s."""
    host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def metadata() -> int:
        connection.request("GET", "/fhir/metadata")
        response = connection.getresponse()
        response.read()
        return response.status

    try:
        assert metadata() == 200
        first = connection.sock.getsockname()
        time.sleep(7)
        assert metadata() == 200
        assert connection.sock.getsockname() == first  # the same connection, not a new one
    finally:
        connection.close()


def test_start_up_objects_are_frozen_out_of_full_collections(mongod: EmbeddedMongod, tmp_path: Path) -> None:
    """What a server process builds at start-up lives as long as the process, and every full
    garbage collection walked it, stopping every request for about 150 ms: once started,
    the app has moved it to the collector's permanent generation (gc.freeze)."""
    settings = Settings(mongodb_uri=mongod.uri, mongodb_database="kuroshio_test_freeze", data_dir=tmp_path,
                        validation_workers=0)
    app = create_app(settings, dimse=False)

    async def started() -> int:
        async with app.router.lifespan_context(app):
            return gc.get_freeze_count()

    gc.unfreeze()
    ucum_registry.cache_clear()
    ucum_parser.cache_clear()
    try:
        assert asyncio.run(started()) > 50_000
        # UCUM's registry and grammar (built on a write's first quantity, or terminology's
        # first UCUM code, they were left to every walk; terminology had its own registry)
        assert ucum_registry.cache_info().currsize == 1 and ucum_parser.cache_info().currsize == 1
        assert not any(o is ucum_registry() or o is ucum_parser() for o in gc.get_objects())
    finally:
        gc.unfreeze()  # this test process's objects go back to the collector
