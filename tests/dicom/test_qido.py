"""QIDO-RS matching (PS3.18 8.3.4, PS3.4 C.2.2.2): UID lists, wildcards, ranges, person
names (case rules, fuzzy), includefield, paging, Warning headers, and malformed queries."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from pydicom.uid import generate_uid

from server.dicom import qido
from tests.dicom.conftest import ct_instance, encode, multipart_body

JSON = {"Accept": "application/dicom+json"}


@pytest.fixture(scope="module")
def corpus(server):
    """Three studies of one made-up patient family, stored once for this module."""
    import httpx

    tag = generate_uid()[-10:]
    specs = [
        ("Müller^Jörg", f"Q{tag}-1", "20240110", "093000", "CT"),
        ("MULLER^Anna", f"Q{tag}-2", "20240215", "141500", "MR"),
        ("Smith^John", f"Q{tag}-3", "20231231", "235959", "CT"),
    ]
    studies = []
    parts = []
    for name, patient_id, date, time, modality in specs:
        study, series = generate_uid(), generate_uid()
        for number in (1, 2):
            ds = ct_instance(study, series, number=number, patient_id=patient_id, patient_name=name,
                             modality=modality, study_date=date)
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.StudyTime = time
            parts.append(encode(ds))
        studies.append(study)
    body, content_type = multipart_body(parts)
    with httpx.Client(base_url=f"{server.base_url}/dicomweb/") as client:
        assert client.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    return tag, studies


def uids(response):
    assert response.status_code == 200, response.text
    return sorted(r["0020000D"]["Value"][0] for r in response.json())


def test_matching(http, corpus):
    tag, (a, b, c) = corpus
    get = lambda **params: http.get("studies", params=params, headers=JSON)
    assert uids(get(PatientID=f"Q{tag}-*")) == sorted([a, b, c])
    assert uids(get(PatientID=f"Q{tag}-?")) == sorted([a, b, c])
    assert uids(get(StudyInstanceUID=f"{a},{c}")) == sorted([a, c])
    assert uids(get(StudyInstanceUID=f"{a}\\{b}")) == sorted([a, b])
    assert uids(get(PatientID=f"Q{tag}-*", StudyDate="20240101-20241231")) == sorted([a, b])
    assert uids(get(PatientID=f"Q{tag}-*", StudyDate="-20231231")) == [c]
    assert uids(get(PatientID=f"Q{tag}-*", StudyTime="09-12")) == [a]
    assert uids(get(PatientID=f"Q{tag}-*", ModalitiesInStudy="MR")) == [b]
    assert uids(get(PatientID=f"Q{tag}-*", PatientName="smith^john")) == [c]  # PN: case-insensitive
    assert uids(get(PatientID=f"Q{tag}-*", PatientName="M*")) == sorted([a, b])
    assert uids(get(PatientID=f"Q{tag}-*", PatientName="muller", fuzzymatching="true")) == sorted([a, b])
    assert uids(get(PatientID=f"Q{tag}-*", PatientName="jorg", fuzzymatching="true")) == [a]
    assert uids(get(PatientID='{"$gt": ""}')) == []  # a value is data, never an operator


def test_person_names_match_without_trailing_empty_components(http):
    """PS3.5 6.2 (PN): "Trailing null components and their delimiters may be omitted", so
    "Doe^John^^^" and "Doe^John" are one name; a query written either way finds it."""
    tag = generate_uid()[-10:]
    stored = {"Roe^Richard^^^": generate_uid(), "ROE^RITA": generate_uid()}
    parts = [encode(ct_instance(study, patient_id=f"PN{tag}", patient_name=name)) for name, study in stored.items()]
    body, content_type = multipart_body(parts)
    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    get = lambda name: uids(http.get("studies", params={"PatientID": f"PN{tag}", "PatientName": name}, headers=JSON))
    assert get("Roe^Richard") == [stored["Roe^Richard^^^"]]
    assert get("roe^richard^^^^") == [stored["Roe^Richard^^^"]]
    assert get("Roe^Rita^^") == [stored["ROE^RITA"]]
    assert get("Roe^R?ta") == [stored["ROE^RITA"]]
    assert get("Roe^Ric?ard") == [stored["Roe^Richard^^^"]]  # a wildcard query ignores trailing carets too
    assert get("Roe") == []  # still single value matching of the whole name, not a prefix


def test_levels_includefield_paging_and_warnings(http, corpus):
    tag, (a, b, c) = corpus
    study = http.get("studies", params={"StudyInstanceUID": a}, headers=JSON).json()[0]
    for keyword_tag in ("00080061", "00201206", "00201208", "00081190", "00100010", "00080020"):
        assert keyword_tag in study
    assert study["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jörg"
    series = http.get(f"studies/{a}/series", headers=JSON).json()
    assert series[0]["00201209"]["Value"] == [2]
    everywhere = http.get("series", params={"PatientID": f"Q{tag}-2"}, headers=JSON).json()
    assert [s["0020000D"]["Value"][0] for s in everywhere] == [b]
    instances = http.get(f"studies/{a}/instances", headers=JSON).json()
    assert len(instances) == 2 and instances[0]["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]
    with_field = http.get(f"studies/{a}/instances", params={"includefield": "WindowCenter,00281051"}, headers=JSON).json()
    assert with_field[0]["00281050"]["Value"] == [40.0] and "00281051" in with_field[0]
    everything = http.get(f"studies/{a}/instances", params={"includefield": "all"}, headers=JSON).json()
    assert "00280101" in everything[0]  # BitsStored, only in the full metadata
    page1 = uids(http.get("studies", params={"PatientID": f"Q{tag}-*", "limit": 2}, headers=JSON))
    page2 = uids(http.get("studies", params={"PatientID": f"Q{tag}-*", "limit": 2, "offset": 2}, headers=JSON))
    assert len(page1) == 2 and len(page2) == 1 and not set(page1) & set(page2)
    warned = http.get("studies", params={"StudyInstanceUID": a, "BodyPartExamined": "HEAD"}, headers=JSON)
    assert warned.status_code == 200 and "BodyPartExamined" in warned.headers["Warning"]
    instances_in_study = http.get("instances", params={"StudyInstanceUID": a, "InstanceNumber": "2"}, headers=JSON)
    assert len(instances_in_study.json()) == 1


@pytest.mark.parametrize(
    "params",
    [
        {"NoSuchKeyword": "x"},
        {"StudyDate": "2024-01-01"},
        {"StudyInstanceUID": "1.02.3"},
        {"limit": "-1"},
        {"fuzzymatching": "maybe"},
        {"StudyTime": "99x"},
        {"StudyDate": "20201301"},  # no 13th month: it matched nothing, with a 200
        {"StudyDate": "20230229"},
        {"StudyDate": "20240101-20201301"},
        {"StudyDate": "20241231-20240101"},  # a range that starts after it ends
        {"StudyTime": "2500"},
        {"StudyTime": "1261"},
        {"StudyTime": "1200-0900"},
    ],
)
def test_malformed_queries_are_400(http, params):
    response = http.get("studies", params=params, headers=JSON)
    assert response.status_code == 400, response.text
    assert response.headers["Warning"].startswith("299 ")


def test_qido_content_negotiation(http):
    assert http.get("studies", headers={"Accept": "application/dicom+xml"}).status_code == 406
    assert http.get("studies", headers={"Accept": "application/json"}).status_code == 200


def test_instance_searches_return_higher_level_attributes(http, corpus):
    """PS3.18 10.6.3.3.3: a search of all instances returns the study- and series-level
    attributes (Tables 10.6.3-3, -4), one of a study's instances the series-level ones."""
    tag, (a, _, _) = corpus
    study_tags = {"00100010": "PatientName", "00100020": "PatientID", "00080020": "StudyDate", "00080050": "AccessionNumber",
                  "00200010": "StudyID", "00201206": "NumberOfStudyRelatedSeries", "00201208": "NumberOfStudyRelatedInstances"}
    series_tags = {"00200011": "SeriesNumber", "00080060": "Modality", "00201209": "NumberOfSeriesRelatedInstances"}
    everywhere = http.get("instances", params={"PatientID": f"Q{tag}-1"}, headers=JSON).json()
    assert len(everywhere) == 2
    for tag_, keyword in (study_tags | series_tags).items():
        assert everywhere[0].get(tag_, {}).get("Value"), keyword
    assert everywhere[0]["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jörg"
    assert everywhere[0]["00081190"]["Value"][0].endswith(everywhere[0]["00080018"]["Value"][0])  # its own RetrieveURL
    in_study = http.get(f"studies/{a}/instances", headers=JSON).json()
    for tag_, keyword in series_tags.items():
        assert in_study[0].get(tag_, {}).get("Value"), keyword


@pytest.mark.parametrize(
    "query",
    [
        "PatientName=" + "*" * 5000,  # MongoDB refused the regex as too large: a 500
        "PatientName=" + "*a" * 3000,
        "PatientName=" + "x" * 5000,  # a person name is matched as a pattern even without wildcards
        "%ED%A0%80=1",  # a key that is not UTF-8: its 400's Warning header failed to encode
        "%C3%A9=1",  # a key outside latin-1... and one inside it
        "%E6%97%A5=1",
        "StudyInstanceUID=%00",  # a NUL in the Warning header dropped the connection
    ],
)
def test_odd_queries_are_400_with_an_ascii_warning(http, query):
    response = http.get(f"studies?{query}", headers=JSON)
    assert response.status_code == 400, response.text
    assert response.headers["Warning"].startswith("299 ")
    assert response.headers["Warning"].isascii()


def test_a_nul_character_in_a_wildcard_value_matches_literally(http, corpus):
    tag, _ = corpus
    for params in ({"PatientID": f"Q{tag}-\x00*"}, {"PatientName": "M\x00*"}, {"PatientName": "M\x00ller^J"},
                   {"PatientName": "m\x00ller", "fuzzymatching": "true"}):
        assert uids(http.get("studies", params=params, headers=JSON)) == []


async def _searches_in_process(mongod_uri: str, data_dir, studies: dict[str, int], searches: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Store `studies` (UID -> instance count) by STOW-RS into an in-process app on a
    private database of the test mongod, run `searches` (path under /dicomweb, params),
    and drop the database."""
    from server.app import create_app
    from server.config import Settings

    settings = Settings(mongodb_uri=mongod_uri, mongodb_database=f"kuroshio_qido_{uuid.uuid4().hex[:8]}",
                        data_dir=data_dir, validation_workers=0)
    app = create_app(settings, dimse=False)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=f"{settings.base_url}/dicomweb/", timeout=60) as client:
                for study, count in studies.items():
                    series = generate_uid()
                    body, content_type = multipart_body([encode(ct_instance(study, series, number=n)) for n in range(1, count + 1)])
                    stored = await client.post("studies", content=body, headers={"Content-Type": content_type})
                    assert stored.status_code == 200, stored.text
                return [await client.get(path, params=params, headers=JSON) for path, params in searches]
    finally:
        from pymongo import AsyncMongoClient

        mongo: AsyncMongoClient = AsyncMongoClient(mongod_uri)
        await mongo.drop_database(settings.mongodb_database)
        await mongo.close()


def test_more_results_warning_only_when_more_match_than_the_maximum(mongod, tmp_path, monkeypatch):
    """QIDO-RS (PS3.18): the "number of results exceeded the maximum" Warning is
    sent when more match than the server answers (qido.MAX_LIMIT, 2 here), not when exactly
    that many do, nor when the client's own `limit` cut the answer. In process, so that the
    limit can be lowered (it is read per request)."""
    monkeypatch.setattr(qido, "MAX_LIMIT", 2)
    three, two = generate_uid(), generate_uid()
    responses = asyncio.run(_searches_in_process(mongod.uri, tmp_path, {three: 3, two: 2}, [
        (f"studies/{three}/instances", {}),
        (f"studies/{two}/instances", {}),
        (f"studies/{two}/instances", {"limit": "1"}),
        (f"studies/{three}/instances", {"offset": "1"}),
        ("studies", {"limit": "5"}),
    ]))
    counts = [len(r.json()) for r in responses]
    warned = ["exceeded the maximum" in r.headers.get("Warning", "") for r in responses]
    assert counts == [2, 2, 1, 2, 2]
    assert warned == [True, False, False, False, False]


def test_integers_outside_their_range_are_400(http):
    """An integer key's value outside the range of its VR (IS: 32-bit signed, PS3.5 6.2) is a
    400 naming the attribute; past 8 bytes it was MongoDB's OverflowError, a 500. A stored
    value outside it is kept, but not matchable; one past 64 bits (more than IS's 12
    characters) cannot be stored: it is refused as not understood (STOW answered 500)."""
    study = generate_uid()
    for path, keyword in (("instances", "InstanceNumber"), (f"studies/{study}/instances", "InstanceNumber"),
                          ("series", "SeriesNumber"), (f"studies/{study}/series", "SeriesNumber")):
        for value in ("99999999999999999999999", "-99999999999999999999999", "2147483648", "1_0", "9" * 5000):
            response = http.get(path, params={keyword: value}, headers=JSON)
            assert response.status_code == 400, (path, value[:30], response.status_code)
            assert keyword in response.headers["Warning"]
        assert http.get(path, params={keyword: "2147483647"}, headers=JSON).status_code == 200
    stored, refused = ct_instance(study), ct_instance(study)
    stored.InstanceNumber = "3000000000"
    refused.InstanceNumber = "99999999999999999999"
    body, content_type = multipart_body([encode(stored), encode(refused)])
    response = http.post("studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 202, response.text
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert len(http.get(f"studies/{study}/instances", headers=JSON).json()) == 1
