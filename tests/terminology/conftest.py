"""Terminology fixtures: load content with the library calls (as `kuroshio terminology
load` does) into the test database that the live test server reads."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conformance.shared_data import shared_data as find_shared_data
from server.config import Settings
from server.store.database import Store
from server.store.mongod import EmbeddedMongod
from tests.conftest import DATABASE

T = TypeVar("T")
FIXTURES = Path(__file__).parent / "fixtures"
def shared_data() -> Path:
    """The shared data folder; a path that does not exist when there is none, so the
    tests that need it fail saying what is missing."""
    return find_shared_data() or Path("/nonexistent/shared/data")


LOINC_SUBSET = shared_data() / "loinc-subset"
HOSPITAL = "http://hospital.example.org/fhir/CodeSystem/lab"


def with_store(uri: str, job: Callable[[Store], Awaitable[T]]) -> T:
    """Run `job` against the test database with the terminology hooks installed."""
    from terminology.definitions import install

    async def main() -> T:
        store = await Store.open(uri, DATABASE)
        install(store, Settings(mongodb_uri=uri))
        try:
            return await job(store)
        finally:
            await store.close()

    return asyncio.run(main())


@pytest.fixture(scope="session")
def loaded(mongod: EmbeddedMongod) -> dict[str, Any]:
    """LOINC subset, the RF2 fixture edition and the hospital table, loaded once."""
    from terminology.loaders.local import load_local_table
    from terminology.loaders.loinc import load_loinc
    from terminology.loaders.snomed import load_rf2

    if not LOINC_SUBSET.is_dir():
        pytest.fail(f"{LOINC_SUBSET} is missing (the shared LOINC subset)")

    async def load(store: Store) -> dict[str, Any]:
        return {
            "loinc": await load_loinc(store, LOINC_SUBSET),
            "snomed": await load_rf2(store, FIXTURES / "rf2"),
            "hospital": await load_local_table(store, FIXTURES / "hospital-lab-codes.csv", HOSPITAL, "hospital-lab", "zh-CN"),
        }

    return with_store(mongod.uri, load)
