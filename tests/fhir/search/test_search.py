"""Search over HTTP: every parameter type, modifiers, prefixes, chains, includes, paging,
result controls, compartments and error handling (search.html)."""

from __future__ import annotations

import json
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.fhir.helpers import FHIR_JSON


def search(fhir, ds, query: str, **headers):
    separator = "&" if "?" in query else "?"
    response = fhir.get(f"{query}{separator}_tag={ds.tag}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def found(fhir, ds, query: str, mode: str = "match") -> set[str]:
    names = {v: k for k, v in ds.ids.items()}
    bundle = search(fhir, ds, query)
    return {
        names.get(e["resource"]["id"], e["resource"]["id"])
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") == mode
    }


@pytest.mark.parametrize(
    "query,expected",
    [
        ("Patient?family=muller", {"p1"}),  # accent- and case-insensitive
        ("Patient?family=MÜL", {"p1"}),  # prefix
        ("Patient?family=smith", {"p2", "p3"}),
        ("Patient?family:exact=Smith", {"p2"}),
        ("Patient?family:exact=smith", set()),
        ("Patient?name:contains=ithso", {"p3"}),
        ("Patient?given=hans", {"p1"}),
        ("Patient?address-city=zurich", {"p1"}),
        ("Patient?family=smith,muller", {"p1", "p2", "p3"}),  # OR
        ("Patient?family=smith&gender=female", {"p2"}),  # AND
        ("Patient?family=smith&family=smithson", {"p3"}),  # AND of the same parameter
        ("Patient?family:missing=true", set()),
        ("Patient?birthdate:missing=false", {"p1", "p2", "p3"}),
    ],
)
def test_strings(fhir, dataset, query, expected):
    assert found(fhir, dataset, query) == expected


@pytest.mark.parametrize(
    "query,expected",
    [
        ("Observation?code=2345-7", {"o1", "o2"}),
        ("Observation?code=http://loinc.org|2345-7", {"o1", "o2"}),
        ("Observation?code=http://other.org|2345-7", set()),
        ("Observation?code=|2345-7", set()),  # explicitly no system
        ("Observation?code=http://loinc.org|", {"o1", "o2", "o3", "o4"}),
        ("Observation?code:text=glucose", {"o1"}),
        ("Observation?code:text=heart", {"o3"}),
        ("Observation?code:not=2345-7", {"o3", "o4"}),
        ("Observation?status=final,amended", {"o1", "o2", "o3", "o4"}),
        ("Observation?status:not=final", {"o2"}),
        ("Patient?identifier=urn:x|A2", {"p2"}),
        ("Patient?identifier=A1", {"p1"}),
        ("Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|A1", {"p1"}),
        ("Patient?gender=male", {"p1", "p3"}),
        ("Patient?active=true", {"p1"}),
        ("Patient?deceased=true", {"p3"}),
        # `Patient.deceased.exists() and Patient.deceased != false` is false without deceased[x]
        ("Patient?deceased=false", {"p1", "p2"}),
        ("Patient?phone=555-0100", {"p1"}),
        ("Observation?category=laboratory", {"o1"}),
    ],
)
def test_tokens(fhir, dataset, query, expected):
    assert found(fhir, dataset, query) == expected


def test_le_and_lt_find_any_value_of_a_parameter_with_several(fhir):
    """`le`/`lt` match when some value starts early enough, and that is the earliest one:
    a Goal with targets due in 2020 and 2030 is due `le2021` and `ge2029`, not `lt2020`."""
    marker = f"urn:goal-{uuid.uuid4().hex[:8]}"
    goal = {
        "resourceType": "Goal", "lifecycleStatus": "active", "identifier": [{"system": marker, "value": "1"}],
        "description": {"text": "two targets"}, "subject": {"reference": "Patient/anyone"},
        "target": [{"dueDate": "2030-06-01"}, {"dueDate": "2020-03-01"}],
    }
    response = fhir.post("Goal", json=goal, headers=FHIR_JSON)
    assert response.status_code == 201, response.text

    def matches(value: str) -> bool:
        response = fhir.get("Goal", params={"identifier": f"{marker}|1", "target-date": value})
        assert response.status_code == 200, response.text
        return response.json().get("total", len(response.json().get("entry", []))) == 1

    assert matches("le2021-01-01")
    assert matches("le2020-03-01")
    assert matches("lt2020-03-02")
    assert not matches("lt2020-03-01")
    assert not matches("le2020-02-29")
    assert matches("ge2029")
    assert matches("le2021,ge2035")
    assert not matches("lt2020,ge2035")


def test_system_bar_finds_values_with_a_system_and_no_code(fhir, db):
    """`identifier=system|` is any identifier in that system (search.html, token): one
    with a system and no value too, and likewise a Coding with a system and no code. A
    resource stored before that term existed is found after `$reindex`."""
    system = f"urn:system-only-{uuid.uuid4().hex[:8]}"

    def create(resource: dict) -> str:
        response = fhir.post(resource["resourceType"], json=resource, headers=FHIR_JSON)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def ids(type_: str, **params: str) -> set[str]:
        response = fhir.get(type_, params=params)
        assert response.status_code == 200, response.text
        return {e["resource"]["id"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"}

    bare = create({"resourceType": "Patient", "identifier": [{"system": system}]})
    valued = create({"resourceType": "Patient", "identifier": [{"system": system, "value": "1"}]})
    longer = create({"resourceType": "Patient", "identifier": [{"system": system + "x"}]})
    coded = create({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": system}]}})
    assert ids("Patient", identifier=f"{system}|") == {bare, valued}
    assert ids("Patient", identifier=f"{system}|1") == {valued}
    assert ids("Patient", identifier=f"{system}x|") == {longer}
    assert ids("Patient", **{"identifier:not": f"{system}|", "_id": f"{bare},{valued},{longer}"}) == {longer}
    assert ids("Patient", **{"identifier:missing": "true", "_id": bare}) == set()
    assert ids("Observation", code=f"{system}|") == {coded}
    # the terms as stored before this key existed
    db["fhir_resources"].update_one({"_id": f"Patient/{bare}"}, {"$pull": {"s.k": f"identifier|{system}|"}})
    assert ids("Patient", identifier=f"{system}|") == {valued}
    assert fhir.post("Patient/$reindex", json={"resourceType": "Parameters"}, headers=FHIR_JSON).status_code == 200
    assert ids("Patient", identifier=f"{system}|") == {bare, valued}


@pytest.mark.parametrize(
    "query,expected",
    [
        ("Observation?date=2020-01-02", {"o1"}),
        ("Observation?date=2020-01", {"o1"}),
        ("Observation?date=2020", {"o1", "o2"}),
        ("Observation?date=eq2020-02", {"o2"}),  # the period lies within February
        ("Observation?date=2020-02-02", set()),  # the period is not contained in one day
        ("Observation?date=ne2020", {"o3"}),
        ("Observation?date=gt2019-12-31", {"o1", "o2"}),
        ("Observation?date=ge2020-02-03", {"o2"}),
        ("Observation?date=lt2020-01-02T11:00:00Z", {"o1", "o3"}),
        ("Observation?date=le2019", {"o3"}),
        ("Observation?date=sa2020-01-31", {"o2"}),
        ("Observation?date=eb2020-01-01", {"o3"}),
        # ap: within 10% of the distance from now (years away: months wide)
        ("Observation?date=ap2020-01-02", {"o1", "o2", "o3"}),
        ("Observation?date=ap2019-12", {"o1", "o2", "o3"}),
        ("Observation?date:missing=true", {"o4"}),
        ("Encounter?date=2020-01-03", set()),
        ("Encounter?date=ge2020-01-03", {"e1"}),
        ("Encounter?date=ge2020-01-05", {"e1"}),  # the period ends within the searched day
        ("Encounter?date=le2020-01-01", {"e1"}),  # and starts within this one
        ("Encounter?date=ge2020-01-06", set()),
        ("Encounter?date=le2019-12-31", set()),
        ("Patient?birthdate=1980", {"p2"}),
        ("Patient?birthdate=1980-05-01", set()),  # the year is wider than the day
        ("Patient?birthdate=lt1985", {"p1", "p2"}),
        ("Patient?birthdate=1990", {"p3"}),
        ("Patient?death-date=2020", {"p3"}),
    ],
)
def test_dates_follow_range_semantics(fhir, dataset, query, expected):
    assert found(fhir, dataset, query) == expected


@pytest.mark.parametrize(
    "query,expected",
    [
        ("Observation?value-quantity=100", {"o2", "o3"}),  # 100 means 99.5 .. 100.5
        ("Observation?value-quantity=100.0", {"o2"}),  # 99.95 .. 100.05
        ("Observation?value-quantity=1e2", {"o2", "o3", "o4"}),  # one significant figure
        ("Observation?value-quantity=gt100", {"o4"}),
        ("Observation?value-quantity=ge100.6", {"o4"}),
        ("Observation?value-quantity=lt2", {"o1"}),
        ("Observation?value-quantity=100||/min", {"o3"}),
        ("Observation?value-quantity=100|http://unitsofmeasure.org|/min", {"o3"}),
        ("Observation?value-quantity=150|http://unitsofmeasure.org|mg/dL", {"o1"}),  # 1.5 g/L
        ("Observation?value-quantity=gt0.5|http://unitsofmeasure.org|g/L", {"o1", "o2"}),
        ("Observation?value-quantity=ap100|http://unitsofmeasure.org|mg/dL", {"o2"}),
        ("RiskAssessment?probability=0.8", {"ra1"}),
        ("RiskAssessment?probability=gt0.9", set()),
        ("RiskAssessment?probability=le0.8", {"ra1"}),
    ],
)
def test_numbers_and_quantities(fhir, dataset, query, expected):
    assert found(fhir, dataset, query) == expected


@pytest.mark.parametrize(
    "query,expected",
    [
        # "[parameter]=100: ... searching for values in the range [99.5 ... 100.5)": the
        # upper end is open, so 99 ([98.5, 99.5)) does not find 99.5, and 101 finds 100.6
        ("Observation?value-quantity=99", set()),
        ("Observation?value-quantity=ne99", {"o1", "o2", "o3", "o4"}),
        ("Observation?value-quantity=101", {"o4"}),
        ("Observation?value-quantity=1.5|http://unitsofmeasure.org|g/L", {"o1"}),
        ("Observation?value-quantity=1|http://unitsofmeasure.org|g/L", {"o2"}),  # [0.5, 1.5) g/L
        # "When a comparison prefix in the set lgt, lt, ge, le, sa & eb is provided, the
        # implicit precision of the number is ignored": ge1e2 is >= exactly 100 (not 50)
        ("Observation?value-quantity=ge1e2", {"o2", "o4"}),
        ("Observation?value-quantity=le1e2", {"o1", "o2", "o3"}),
        ("Observation?value-quantity=gt1e2", {"o4"}),
        ("Observation?value-quantity=lt1e2", {"o1", "o3"}),
        ("Observation?value-quantity=sa1e2", {"o4"}),
        ("Observation?value-quantity=eb1e2", {"o1", "o3"}),
        ("Observation?value-quantity=le1e2|http://unitsofmeasure.org|mg/dL", {"o2"}),  # 1.5 g/L is 150 mg/dL
        ("Observation?value-quantity=ge1e2|http://unitsofmeasure.org|mg/dL", {"o1", "o2"}),
        ("RiskAssessment?probability=ge1", set()),
        ("RiskAssessment?probability=le0.7", set()),
        ("Observation?code-value-quantity=8867-4$le1e2", {"o3"}),
    ],
)
def test_number_precision_is_a_half_open_range_and_prefixes_ignore_it(fhir, dataset, query, expected):
    assert found(fhir, dataset, query) == expected


def test_references(fhir, dataset):
    p1, p3 = dataset["p1"], dataset["p3"]
    assert found(fhir, dataset, f"Observation?subject=Patient/{p1}") == {"o1", "o2"}
    assert found(fhir, dataset, f"Observation?subject={p1}") == {"o1", "o2"}
    assert found(fhir, dataset, f"Observation?subject:Patient={p1}") == {"o1", "o2"}
    assert found(fhir, dataset, f"Observation?patient=Patient/{p1}") == {"o1", "o2"}
    assert found(fhir, dataset, f"Observation?subject={fhir.base_url}Patient/{p1}") == {"o1", "o2"}
    assert found(fhir, dataset, f"Observation?subject:Group={p1}") == set()
    assert found(fhir, dataset, "Observation?subject:identifier=urn:x|A3") == {"o4"}
    assert found(fhir, dataset, f"Observation?encounter:missing=false&subject=Patient/{p1}") == {"o1"}
    assert found(fhir, dataset, f"Patient?_id={p1},{p3}") == {"p1", "p3"}
    assert found(fhir, dataset, f"Patient?_id:not={p1}") == {"p2", "p3"}


def test_uris(fhir, dataset):
    assert found(fhir, dataset, "ValueSet?url=http://example.org/fhir/ValueSet/abc/def") == {"vs1"}
    assert found(fhir, dataset, "ValueSet?url=http://example.org/fhir/ValueSet/abc") == set()
    assert found(fhir, dataset, "ValueSet?url:below=http://example.org/fhir/ValueSet") == {"vs1"}
    assert found(fhir, dataset, "ValueSet?url:above=http://example.org/fhir/ValueSet/abc/def/ghi") == {"vs1"}
    assert found(fhir, dataset, "ValueSet?url:above=http://example.org/fhir/ValueSet/abc") == set()


def test_uri_below_and_above_match_whole_path_segments(fhir):
    """search.html (uri): `url:below=http://acme.org/fhir/` matches
    `http://acme.org/fhir/ValueSet/123`, and `:above` matches the URLs at or above the value
    "on path segments": `http://acme.org/fhir` is not above `http://acme.org/fhirx/...`."""
    root = f"http://acme-{uuid.uuid4().hex[:8]}.org"
    urls = {"vs": f"{root}/fhir/ValueSet/123", "other": f"{root}/fhirx/ValueSet/1",
            "base": f"{root}/fhir", "slash": f"{root}/fhir/"}
    ids = {}
    for name, url in urls.items():
        response = fhir.post("ValueSet", json={"resourceType": "ValueSet", "status": "active", "url": url}, headers=FHIR_JSON)
        assert response.status_code == 201, response.text
        ids[response.json()["id"]] = name

    def search(modifier: str, value: str) -> set[str]:
        response = fhir.get("ValueSet", params={f"url:{modifier}": value})
        assert response.status_code == 200, response.text
        return {ids[e["resource"]["id"]] for e in response.json().get("entry", []) if e["resource"]["id"] in ids}

    assert search("below", f"{root}/fhir") == {"vs", "base", "slash"}
    assert search("below", f"{root}/fhir/") == {"vs", "base", "slash"}
    assert search("below", f"{root}/fhir/ValueSet/12") == set()
    assert search("below", root) == set(urls)
    assert search("above", f"{root}/fhir/ValueSet/123/_history/5") == {"vs", "base", "slash"}
    assert search("above", f"{root}/fhir") == {"base", "slash"}
    assert search("above", f"{root}/fhirx/ValueSet/1") == {"other"}


def test_composites(fhir, dataset):
    assert found(fhir, dataset, "Observation?code-value-quantity=http://loinc.org|2345-7$gt1|http://unitsofmeasure.org|g/L") == {"o1"}
    assert found(fhir, dataset, "Observation?code-value-quantity=8867-4$100") == {"o3"}
    assert found(fhir, dataset, "Observation?component-code-value-quantity=8480-6$120") == {"o3"}
    assert found(fhir, dataset, "Observation?combo-code-value-quantity=8480-6$ge120") == {"o3"}
    assert found(fhir, dataset, "Observation?component-code-value-quantity=8480-6$121") == set()


def test_missing_on_composites_of_the_resource_itself(fhir, dataset):
    """`code-value-quantity` pairs `Observation.code` with `Observation.value` (its
    expression is the resource itself): an Observation with a code and a valueQuantity has
    a value for it. search.html: "missing=true ... returns all resources that don't have a
    value for the parameter", and missing=false those that do."""
    assert found(fhir, dataset, "Observation?code-value-quantity:missing=false") == {"o1", "o2", "o3", "o4"}
    assert found(fhir, dataset, "Observation?code-value-quantity:missing=true") == set()
    assert found(fhir, dataset, "Observation?component-code-value-quantity:missing=false") == {"o3"}
    assert found(fhir, dataset, "Observation?component-code-value-quantity:missing=true") == {"o1", "o2", "o4"}
    assert found(fhir, dataset, "Observation?combo-code-value-quantity:missing=false") == {"o1", "o2", "o3", "o4"}


def test_common_parameters(fhir, dataset):
    assert found(fhir, dataset, "Patient?_profile=http://example.org/StructureDefinition/vip") == {"p1"}
    assert found(fhir, dataset, "Patient?_security=urn:sec|R") == {"p1"}
    assert found(fhir, dataset, "Patient?_source=urn:source:lab") == {"p1"}
    assert found(fhir, dataset, "Patient?_lastUpdated=gt2000-01-01") == {"p1", "p2", "p3"}
    assert found(fhir, dataset, "Patient?_lastUpdated=lt2000-01-01") == set()
    assert found(fhir, dataset, "Patient?_text=gardener") == {"p1"}
    assert found(fhir, dataset, "Patient?_content=Smithson") == {"p3"}
    assert found(fhir, dataset, f"Observation?_list={dataset['l1']}") == {"o1", "o3"}


def test_chains_and_reverse_chains(fhir, dataset):
    assert found(fhir, dataset, "Observation?subject.name=muller") == {"o1", "o2"}
    assert found(fhir, dataset, "Observation?subject:Patient.gender=male") == {"o1", "o2", "o4"}
    assert found(fhir, dataset, "Observation?subject:Patient.general-practitioner.name=welby") == {"o1", "o2"}
    assert found(fhir, dataset, "Observation?patient.general-practitioner:Practitioner.family=welby") == {"o1", "o2"}
    assert found(fhir, dataset, "Patient?_has:Observation:subject:code=8867-4") == {"p2", "p3"}
    assert found(fhir, dataset, "Patient?_has:Observation:patient:status=amended") == {"p1"}
    assert found(fhir, dataset, f"Patient?_has:Observation:subject:_has:List:item:_id={dataset['l1']}") == {"p1", "p2"}
    assert found(fhir, dataset, "Practitioner?_has:Patient:general-practitioner:_has:Observation:subject:code=2345-7") == {"pr1"}


def test_includes(fhir, dataset):
    query = f"Observation?subject=Patient/{dataset['p1']}&_include=Observation:subject"
    assert found(fhir, dataset, query, "include") == {"p1"}
    query += "&_include:iterate=Patient:general-practitioner"
    assert found(fhir, dataset, query, "include") == {"p1", "pr1"}
    assert found(fhir, dataset, "Observation?code=2345-7&_include=*", "include") == {"p1", "e1"}
    assert found(fhir, dataset, "Observation?code=2345-7&_include=Observation:subject:Group", "include") == set()
    assert found(fhir, dataset, "Patient?family=muller&_revinclude=Encounter:subject", "include") == {"e1"}
    assert found(fhir, dataset, "Patient?family=muller&_revinclude=Observation:subject&_revinclude:iterate=List:item", "include") == {"o1", "o2", "l1"}
    assert found(fhir, dataset, "Practitioner?name=welby&_revinclude=*", "include") == {"p1", "e1"}


def test_sort(fhir, dataset):
    def order(query):
        names = {v: k for k, v in dataset.ids.items()}
        return [names[e["resource"]["id"]] for e in search(fhir, dataset, query).get("entry", [])]

    assert order("Patient?_sort=birthdate") == ["p1", "p2", "p3"]
    assert order("Patient?_sort=-birthdate") == ["p3", "p2", "p1"]
    assert order("Patient?_sort=gender,-birthdate") == ["p2", "p3", "p1"]
    assert order("Observation?code=2345-7&_sort=-date") == ["o2", "o1"]
    assert order("Patient?_sort=family") == ["p1", "p2", "p3"]


def test_sort_by_last_updated_pages_in_write_order(fhir, dataset):
    for direction in ("", "-"):
        names = {v: k for k, v in dataset.ids.items()}
        seen: list[str] = []
        bundle = search(fhir, dataset, f"Observation?_count=1&_sort={direction}_lastUpdated")
        while True:
            seen += [names[e["resource"]["id"]] for e in bundle["entry"]]
            links = {link["relation"]: link["url"] for link in bundle["link"]}
            if "next" not in links:
                break
            bundle = fhir.get(links["next"]).json()
        stamps = [fhir.get(f"Observation/{dataset.ids[name]}").json()["meta"]["lastUpdated"] for name in seen]
        assert stamps == sorted(stamps, reverse=direction == "-")
        assert sorted(seen) == ["o1", "o2", "o3", "o4"]


def test_paging_with_cursors_next_previous_and_self(fhir, dataset):
    seen, url, pages = [], "Observation?_count=1&_sort=date&_total=accurate", []
    bundle = search(fhir, dataset, url)
    while True:
        pages.append(bundle)
        assert bundle["total"] == 4
        seen += [e["resource"]["id"] for e in bundle["entry"]]
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert "self" in links
        if "next" not in links:
            break
        response = fhir.get(links["next"])
        assert response.status_code == 200, response.text
        bundle = response.json()
    assert len(seen) == len(set(seen)) == 4
    # walk back with previous links
    back = []
    while True:
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        back += [e["resource"]["id"] for e in bundle["entry"]]
        if "previous" not in links:
            break
        bundle = fhir.get(links["previous"]).json()
    assert back == list(reversed(seen))


def test_paging_is_stable_while_data_changes(fhir, dataset):
    bundle = search(fhir, dataset, "Patient?_count=2&_sort=birthdate")
    first = [e["resource"]["id"] for e in bundle["entry"]]
    # a new patient that sorts first must not shift the next page
    created = fhir.post("Patient", json={"resourceType": "Patient", "birthDate": "1900", "meta": {"tag": [{"system": "urn:other", "code": "x"}]}}, headers=FHIR_JSON)
    assert created.status_code == 201
    next_url = {link["relation"]: link["url"] for link in bundle["link"]}["next"]
    second = [e["resource"]["id"] for e in fhir.get(next_url).json()["entry"]]
    assert first == [dataset["p1"], dataset["p2"]] and second == [dataset["p3"]]


def test_total_summary_and_elements(fhir, dataset):
    assert "total" not in search(fhir, dataset, "Patient?_total=none")
    assert search(fhir, dataset, "Patient")["total"] == 3  # by default: when one page holds all
    assert "total" not in search(fhir, dataset, "Patient?_count=1")  # else only when asked
    first = search(fhir, dataset, "Patient?_count=1&_total=estimate")  # counted on the first page
    assert first["total"] == 3
    following = fhir.get(next(link["url"] for link in first["link"] if link["relation"] == "next")).json()
    assert "total" not in following
    assert search(fhir, dataset, "Patient?_total=accurate")["total"] == 3
    counted = search(fhir, dataset, "Patient?_summary=count")
    assert counted["total"] == 3 and "entry" not in counted
    summary = search(fhir, dataset, "Patient?family=muller&_summary=true")["entry"][0]["resource"]
    assert "text" not in summary and summary["name"][0]["family"] == "Müller"
    assert {"code": "SUBSETTED"}.items() <= summary["meta"]["tag"][-1].items()
    text = search(fhir, dataset, "Patient?family=muller&_summary=text")["entry"][0]["resource"]
    assert "text" in text and "name" not in text
    data = search(fhir, dataset, "Patient?family=muller&_summary=data")["entry"][0]["resource"]
    assert "text" not in data and "name" in data
    elements = search(fhir, dataset, "Patient?family=muller&_elements=gender")["entry"][0]["resource"]
    assert elements["gender"] == "male" and "name" not in elements and elements["id"] == dataset["p1"]
    # the matches are reduced, included resources come whole (conformance/fhir-search.md)
    bundle = search(fhir, dataset, f"Observation?subject=Patient/{dataset['p1']}&_include=Observation:subject&_elements=status")
    modes = {e["search"]["mode"]: e["resource"] for e in bundle["entry"]}
    assert "subject" not in modes["match"] and modes["match"]["status"]
    assert modes["include"]["name"][0]["family"] == "Müller" and "SUBSETTED" not in str(modes["include"]["meta"])


def test_post_search_with_a_form(fhir, dataset):
    response = fhir.post(
        "Patient/_search", content=f"family=smith&_tag={dataset.tag}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert {e["resource"]["id"] for e in response.json()["entry"]} == {dataset["p2"], dataset["p3"]}
    wrong = fhir.post("Patient/_search", content=b'{"a":1}', headers=FHIR_JSON)
    assert wrong.status_code == 415


def test_system_search(fhir, dataset):
    names = {v: k for k, v in dataset.ids.items()}
    root = str(fhir.base_url).rstrip("/")
    bundle = search(fhir, dataset, f"{root}?_type=Patient,Practitioner&_sort=_id")
    assert {names[e["resource"]["id"]] for e in bundle["entry"]} == {"p1", "p2", "p3", "pr1"}
    bundle = fhir.get(root, params={"_tag": dataset.tag, "_count": "100"}).json()
    assert bundle["total"] == len(dataset.ids)


def test_compartments(fhir, dataset):
    p1 = dataset["p1"]
    assert found(fhir, dataset, f"Patient/{p1}/Observation?code=2345-7") == {"o1", "o2"}
    assert found(fhir, dataset, f"Patient/{p1}/Encounter") == {"e1"}
    assert found(fhir, dataset, f"Patient/{p1}/*") == {"p1", "o1", "o2", "e1", "ra1"}
    assert found(fhir, dataset, f"Encounter/{dataset['e1']}/Observation") == {"o1"}
    assert found(fhir, dataset, f"Practitioner/{dataset['pr1']}/Patient") == {"p1"}
    assert found(fhir, dataset, f"Practitioner/{dataset['pr1']}/Encounter") == {"e1"}
    assert found(fhir, dataset, f"RelatedPerson/x/Observation") == set()
    assert found(fhir, dataset, f"Device/x/Observation") == set()
    assert fhir.get(f"Patient/{p1}/ValueSet").status_code == 400  # not in the compartment
    assert fhir.get(f"Observation/{p1}/Patient").status_code == 404  # not a compartment
    assert fhir.get(f"Patient/{p1}/_history").status_code == 200  # literal routes still win
    # the POST form (http.html#search), parameters in the body and the URL
    posted = fhir.post(f"Patient/{p1}/Observation/_search", params={"_tag": dataset.tag}, content="code=2345-7",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert posted.status_code == 200, posted.text
    assert {e["resource"]["id"] for e in posted.json()["entry"]} == {dataset["o1"], dataset["o2"]}
    everything = fhir.post(f"Patient/{p1}/*/_search", content="", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert {e["resource"]["id"] for e in everything.json()["entry"]} >= {dataset[k] for k in ("p1", "o1", "o2", "e1", "ra1")}


def test_unknown_parameters_strict_and_lenient(fhir, dataset):
    strict = fhir.get("Patient", params={"nonsense": "1", "family": "smith"})
    assert strict.status_code == 400
    assert "nonsense" in json.dumps(strict.json())
    lenient = search(fhir, dataset, "Patient?nonsense=1&family=smith", Prefer="handling=lenient")
    assert {e["resource"]["id"] for e in lenient["entry"] if e["search"]["mode"] == "match"} == {dataset["p2"], dataset["p3"]}
    self_link = next(link["url"] for link in lenient["link"] if link["relation"] == "self")
    assert "nonsense" not in self_link and "family=smith" in self_link
    for bad in ("Patient?birthdate=notadate", "Patient?gender:exact=male", "Observation?value-quantity=abc",
                "Patient?_sort=nonsense", "Patient?_count=-1", "Patient?_summary=maybe", "Observation?code:in=http://x/vs",
                "Patient?_include=Observation:subject", "Observation?subject.nonsense=1", "Patient?_type=Observation"):
        response = fhir.get(bad)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"


def test_explain_shows_the_filter_and_index(fhir, dataset):
    bundle = search(fhir, dataset, "Observation?code=2345-7&__explain=true")
    outcome = next(e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome")
    explained = json.loads(outcome["issue"][0]["diagnostics"])
    assert "code#2345-7" in json.dumps(explained["filter"])
    assert "search_keys" in explained["indexes"]


def test_links_carry_the_query(fhir, dataset):
    bundle = search(fhir, dataset, "Patient?family=smith&_count=1")
    next_url = {link["relation"]: link["url"] for link in bundle["link"]}["next"]
    query = parse_qs(urlsplit(next_url).query)
    assert query["family"] == ["smith"] and query["_count"] == ["1"] and "_cursor" in query


def test_near(fhir):
    tag = f"urn:kuroshio-test|near-{uuid.uuid4().hex}"
    location = {"resourceType": "Location", "meta": {"tag": [{"system": "urn:kuroshio-test", "code": tag.split("|")[1]}]},
                "position": {"longitude": 8.5417, "latitude": 47.3769}}
    created = fhir.post("Location", json=location, headers=FHIR_JSON)
    assert created.status_code == 201

    def near(value):
        bundle = fhir.get("Location", params={"near": value, "_tag": tag}).json()
        return {e["resource"]["id"] for e in bundle.get("entry", [])}

    assert near("47.37|8.54|5|km") == {created.json()["id"]}
    assert near("46.2|6.14|50|km") == set()  # Geneva is 220 km away
    assert fhir.get("Location?near=a|b").status_code == 400


def test_ascending_date_order_bounded_below_finds_wide_and_narrow_values(fhir):
    """`date=ge..&_sort=date` starts its index walk near the bound for resources whose
    dates span at most a day and walks the wider ones (Periods, partial dates) apart: a
    Period that started long before the bound but reaches past it is still found, in its
    place in the order (its start), and paging goes through both kinds."""
    code = f"wide-{uuid.uuid4().hex[:8]}"
    values = {
        "instant-before": {"effectiveDateTime": "2009-06-01T10:00:00Z"},
        "period-reaching-in": {"effectivePeriod": {"start": "1990-01-01", "end": "2012-01-01"}},
        "open-period": {"effectivePeriod": {"start": "2001-01-01"}},
        "day-at-bound": {"effectiveDateTime": "2010-01-01"},
        "month-2010": {"effectiveDateTime": "2010-07"},
        "instant-after": {"effectiveDateTime": "2011-03-04T05:06:07+02:00"},
        "month-after": {"effectiveDateTime": "2012-02"},
        "period-after": {"effectivePeriod": {"start": "2013-01-01", "end": "2013-12-31"}},
    }
    ids = {}
    for name, effective in values.items():
        resource = {"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "urn:test", "code": code}]}, **effective}
        response = fhir.post("Observation", json=resource, headers=FHIR_JSON)
        assert response.status_code == 201, response.text
        ids[response.json()["id"]] = name

    def walk(query: str) -> list[str]:
        names, url = [], f"Observation?code=urn:test|{code}&{query}&_count=2"
        while url:
            response = fhir.get(url)
            assert response.status_code == 200, response.text
            bundle = response.json()
            names += [ids[e["resource"]["id"]] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
            url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        return names

    reaching = ["period-reaching-in", "open-period"]  # ordered by their starts
    assert walk("date=ge2010-01-01&_sort=date") == [
        *reaching, "day-at-bound", "month-2010", "instant-after", "month-after", "period-after"]
    assert walk("date=gt2011-06&_sort=date") == [*reaching, "month-after", "period-after"]
    assert walk("date=ge2011&date=le2012-12-31&_sort=date") == [*reaching, "instant-after", "month-after"]
    assert walk("date=eq2010-01-01,sa2012-12-31&_sort=date") == ["day-at-bound", "period-after"]
    assert walk("date=ge2010-01-01&_sort=-date") == list(reversed(walk("date=ge2010-01-01&_sort=date")))
