"""The functions the search engine calls for :in, :not-in, :below and :above."""

from __future__ import annotations

import pytest

from tests.terminology.conftest import HOSPITAL, with_store

SNOMED = "http://snomed.info/sct"


def test_below_above_and_subsumes(mongod, loaded):
    from terminology import search

    below = with_store(mongod.uri, lambda store: search.below(store, SNOMED, "73211009"))
    assert sorted(below) == ["44054006", "46635009", "73211009"]
    above = with_store(mongod.uri, lambda store: search.above(store, SNOMED, "44054006"))
    assert {"44054006", "73211009", "64572001", "404684003", "138875005"} <= set(above)
    assert with_store(mongod.uri, lambda store: search.subsumes(store, SNOMED, "404684003", "44054006"))
    assert not with_store(mongod.uri, lambda store: search.subsumes(store, SNOMED, "44054006", "404684003"))


def test_value_set_codes_and_limits(mongod, loaded):
    from terminology import search

    codes = with_store(mongod.uri, lambda store: search.value_set_codes(store, f"{SNOMED}?fhir_vs=isa/64572001"))
    assert (SNOMED, "38341003") in codes and (SNOMED, "44054006") in codes
    local = with_store(mongod.uri, lambda store: search.value_set_codes(store, f"{HOSPITAL}?fhir_vs"))
    assert (HOSPITAL, "HBA1C") in local
    with pytest.raises(search.TerminologyUnavailable):
        with_store(mongod.uri, lambda store: search.value_set_codes(store, "http://example.org/no-such-vs"))
    with pytest.raises(search.TerminologyUnavailable):
        with_store(mongod.uri, lambda store: search.below(store, SNOMED, "138875005", limit=3))
