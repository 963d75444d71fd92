"""DICOMweb with the dicomweb-client package: STOW, QIDO, WADO (instances, metadata,
frames, bulk data, rendered), delete, and the error forms."""

from __future__ import annotations

import io

import pydicom
from pydicom.uid import generate_uid

from tests.dicom.conftest import ct_instance, encode, multipart_body


def test_stow_qido_wado_roundtrip(dicomweb, http):
    study = generate_uid()
    series = generate_uid()
    instances = [ct_instance(study, series, number=i) for i in range(1, 4)]
    response = dicomweb.store_instances(instances)
    assert len(response.ReferencedSOPSequence) == 3
    found = dicomweb.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert len(found) == 1
    assert found[0]["00201208"]["Value"] == [3]
    assert found[0]["00080061"]["Value"] == ["CT"]
    series_found = dicomweb.search_for_series(study)
    assert series_found[0]["0020000E"]["Value"] == [series]
    listed = dicomweb.search_for_instances(study, series)
    assert [i["00200013"]["Value"][0] for i in listed] == [1, 2, 3]
    retrieved = dicomweb.retrieve_instance(study, series, instances[0].SOPInstanceUID)
    assert retrieved.SOPInstanceUID == instances[0].SOPInstanceUID
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, instances[0])  # what dicomweb-client sent
    sent = buffer.getvalue()
    raw = http.get(f"studies/{study}/series/{series}/instances/{instances[0].SOPInstanceUID}",
                   headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert sent in raw.content
    metadata = dicomweb.retrieve_study_metadata(study)
    assert len(metadata) == 3
    reference = pydicom.dcmread(io.BytesIO(sent)).to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "x")
    mine = next(m for m in metadata if m["00080018"]["Value"][0] == instances[0].SOPInstanceUID)
    assert {k: v for k, v in mine.items() if "BulkDataURI" not in v} == {k: v for k, v in reference.items() if "BulkDataURI" not in v}
    frames = dicomweb.retrieve_instance_frames(study, series, instances[0].SOPInstanceUID, [1])
    assert frames[0] == instances[0].PixelData
    bulk = http.get(mine["7FE00010"]["BulkDataURI"].split("/dicomweb/")[1])
    assert bulk.status_code == 200 and instances[0].PixelData in bulk.content
    rendered = http.get(f"studies/{study}/series/{series}/instances/{instances[0].SOPInstanceUID}/rendered",
                        headers={"Accept": "image/png"}, params={"viewport": "32,32"})
    assert rendered.status_code == 200 and rendered.content.startswith(b"\x89PNG")
    assert http.delete(f"studies/{study}").status_code == 204
    assert dicomweb.search_for_studies(search_filters={"StudyInstanceUID": study}) == []


def test_stow_refuses_broken_and_reports_failure(http):
    good = ct_instance()
    body, content_type = multipart_body([encode(good), b"not dicom at all"])
    response = http.post("studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 202
    result = response.json()
    assert result["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert len(result["00081199"]["Value"]) == 1


def test_wrong_media_type_and_bad_uid(http):
    assert http.post("studies", content=b"{}", headers={"Content-Type": "application/json"}).status_code == 415
    response = http.get("studies/1.2.abc/metadata")
    assert response.status_code == 400 and "Warning" in response.headers
    assert http.get("studies/1.2.3.4.5.6.7/metadata").status_code == 404
