from tests.conftest import FHIR_JSON


def test_create_read_roundtrip_keeps_decimals(fhir):
    sent = b'{"resourceType":"Patient","name":[{"family":"M\xc3\xbcller"}],"extension":[{"url":"http://x","valueDecimal":1.50}]}'
    created = fhir.post("Patient", content=sent, headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    read = fhir.get(location)
    assert read.status_code == 200
    assert b'"valueDecimal":1.50' in read.content
    assert read.headers["ETag"] == 'W/"1"'
