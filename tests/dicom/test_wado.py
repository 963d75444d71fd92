"""WADO-RS retrieval: transfer syntax negotiation (as stored, transcoded, 406), frames of
compressed instances, bulk data URIs, rendered/thumbnail, malformed requests, CORS, and
a STOW larger than the FHIR body limit (streamed to disk)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.conftest import start_server, stop_server
from tests.dicom.conftest import ct_instance, encode, multipart_body

DICOM_ANY = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


def store_file(http, path):
    """Store a copy of a pydicom test file under new UIDs (test files share UIDs)."""
    return store_dataset(http, pydicom.dcmread(path))


def store_dataset(http, ds):
    """Store `ds` under new UIDs, in its own encoding: (bytes, data set, instance URL)."""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out)
    data = out.getvalue()
    body, content_type = multipart_body([data])
    response = http.post("studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    return data, ds, f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def parts(response):
    """The bodies of a multipart/related response."""
    assert response.status_code == 200, response.text
    boundary = [p.split("=", 1)[1].strip('"') for p in response.headers["content-type"].split(";") if p.strip().startswith("boundary=")][0]
    chunks = response.content.split(b"--" + boundary.encode())[1:-1]
    return [chunk.split(b"\r\n\r\n", 1)[1][:-2] for chunk in chunks]


def test_jpeg_instance_negotiation_and_frames(http):
    data, ds, url = store_file(http, get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    assert data in http.get(url, headers=DICOM_ANY).content
    transcoded = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert transcoded.status_code == 200
    assert "transfer-syntax=1.2.840.10008.1.2.1" in transcoded.headers["content-type"]
    decoded = pydicom.dcmread(io.BytesIO(parts(transcoded)[0]))
    assert decoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    rle = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.5'})
    for instance in (decoded, pydicom.dcmread(io.BytesIO(parts(rle)[0]))):  # the same instance, re-encoded
        assert instance.SOPInstanceUID == instance.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert decoded.pixel_array.shape[:2] == (ds.Rows, ds.Columns)
    refused = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80'})
    assert refused.status_code == 406
    as_stored = http.get(f"{url}/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert as_stored.status_code == 200 and parts(as_stored)[0].startswith(b"\xff\xd8")
    raw = http.get(f"{url}/frames/1", headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert len(parts(raw)[0]) == ds.Rows * ds.Columns * 3
    assert http.get(f"{url}/frames/2", headers={"Accept": "multipart/related; type=\"application/octet-stream\""}).status_code == 404


def test_multiframe_frames_and_bulkdata(http):
    data, ds, url = store_file(http, get_testdata_file("emri_small.dcm"))
    full = ds
    frame_size = ds.Rows * ds.Columns * 2
    response = http.get(f"{url}/frames/1,3", headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    frames = parts(response)
    assert frames == [full.PixelData[:frame_size], full.PixelData[2 * frame_size:3 * frame_size]]
    metadata = http.get(f"{url}/metadata").json()[0]
    bulk_url = metadata["7FE00010"]["BulkDataURI"]
    assert bulk_url.startswith("http")
    for frame in (0, 9):
        assert full.PixelData[frame * frame_size:(frame + 1) * frame_size] in http.get(bulk_url).content
    for bad in ("0", "a", "1,,2", "99999999999"):
        assert http.get(f"{url}/frames/{bad}").status_code in (400, 404)


def test_rendered_and_thumbnail(http):
    ds = ct_instance(size=64)
    body, content_type = multipart_body([encode(ds)])
    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    url = f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    jpeg = http.get(f"{url}/rendered", params={"window": "100,200,linear", "viewport": "32,32", "quality": "80"})
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert Image.open(io.BytesIO(jpeg.content)).size == (32, 32)
    assert http.get(f"{url}/frames/1/rendered", headers={"Accept": "image/png"}).content.startswith(b"\x89PNG")
    assert http.get(f"{url}/thumbnail").status_code == 200
    assert http.get(f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/thumbnail").status_code == 200
    assert http.get(f"{url}/rendered", headers={"Accept": "image/gif"}).status_code == 406
    assert http.get(f"{url}/rendered", params={"window": "a,b"}).status_code == 400


@pytest.mark.parametrize(
    "headers,body",
    [
        ({"Content-Type": "multipart/related; type=\"application/dicom\""}, b"--x--"),  # no boundary
        ({"Content-Type": "multipart/related; type=\"application/dicom+json\"; boundary=x"}, b"--x--"),
        ({"Content-Type": "text/plain"}, b"hello"),
        ({"Content-Type": "multipart/related; type=\"application/dicom\"; boundary=x"}, b"garbage without parts"),
    ],
)
def test_malformed_stow(http, headers, body):
    response = http.post("studies", content=body, headers=headers)
    assert 400 <= response.status_code < 500 and response.status_code != 404, response.text


def test_large_stow_is_streamed_past_the_body_limit(http, db):
    ds = ct_instance(size=512)
    ds.NumberOfFrames = 140  # ~73 MB, over the 64 MB FHIR body limit
    ds.PixelData = np.zeros(512 * 512 * 140, dtype=np.uint16).tobytes()
    body, content_type = multipart_body([encode(ds)])
    response = http.post("studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    doc = db.dicom_instances.find_one({"_id": ds.SOPInstanceUID}, {"frames.n": 1})
    assert doc["frames"]["n"] == 140


def test_cors_when_configured(mongod, tmp_path):
    import httpx

    live = start_server(mongod.uri, tmp_path / "cors", {"KUROSHIO_DICOMWEB_CORS_ORIGINS": "https://viewer.example"})
    try:
        response = httpx.options(
            f"{live.base_url}/dicomweb/studies",
            headers={"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET"},
        )
        assert response.headers["access-control-allow-origin"] == "https://viewer.example"
        plain = httpx.get(f"{live.base_url}/dicomweb/studies", headers={"Origin": "https://viewer.example"})
        assert plain.headers["access-control-allow-origin"] == "https://viewer.example"
    finally:
        stop_server(live)


def test_delete_levels(http, dicomweb):
    study, series = generate_uid(), generate_uid()
    instances = [ct_instance(study, series, number=i) for i in (1, 2)]
    dicomweb.store_instances(instances)
    url = f"studies/{study}/series/{series}/instances/{instances[0].SOPInstanceUID}"
    assert http.delete(url).status_code == 204
    assert http.get(f"{url}/metadata").status_code == 404
    assert http.delete(url).status_code == 404
    assert http.get("studies", params={"StudyInstanceUID": study}).json()[0]["00201208"]["Value"] == [1]
    assert http.delete(f"studies/{study}/series/{series}").status_code == 204
    assert http.get("studies", params={"StudyInstanceUID": study}).json() == []
    assert http.delete("studies/not-a-uid").status_code == 400


def test_rendered_accept_query_parameter(http):
    """PS3.18 8.3.5: "All Retrieve transactions for Rendered Media Types shall support these
    parameters", and Table 8.3.5-1 lists `accept` (8.3.3.1) first: a hyperlink such as
    <img src=".../rendered?accept=image/png"> cannot set an Accept header. Media types the
    server does not render fall back to the default, image/jpeg (8.3.3.1)."""
    ds = ct_instance(size=32)
    body, content_type = multipart_body([encode(ds)])
    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    url = f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    for path in (f"{url}/rendered", f"{url}/frames/1/rendered", f"{url}/thumbnail",
                 f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/thumbnail"):
        png = http.get(path, params={"accept": "image/png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png", path
        assert png.content.startswith(b"\x89PNG"), path
    weighted = http.get(f"{url}/rendered", params={"accept": "image/gif,image/png;q=0.5,image/jpeg;q=0.2"})
    assert weighted.headers["content-type"] == "image/png"
    fallback = http.get(f"{url}/rendered", params={"accept": "image/gif"})
    assert fallback.status_code == 200 and fallback.headers["content-type"] == "image/jpeg"
    # the query parameter's types must be compatible with the Accept header (8.3.3.1)
    assert http.get(f"{url}/rendered", params={"accept": "image/png"}, headers={"Accept": "image/jpeg"}).status_code == 406
    mixed = http.get(f"{url}/rendered", params={"accept": "application/dicom,image/png"})
    assert mixed.status_code == 400


def test_rendered_refusals_are_4xx(http):
    """Malformed rendered and thumbnail requests are refused with 4xx, never a 5xx."""
    ds = ct_instance(size=16)
    body, content_type = multipart_body([encode(ds)])
    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    series = f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    url = f"{series}/instances/{ds.SOPInstanceUID}"
    for frame in ("0", "99999999999", "a", "1,2", "2"):
        assert http.get(f"{url}/frames/{frame}/rendered").status_code in (400, 404), frame
    for params in ({"viewport": "0,0"}, {"viewport": "a"}, {"viewport": "8,8,1"}, {"window": "40,0"}, {"quality": "x"}):
        for path in (f"{url}/rendered", f"{url}/thumbnail", f"{series}/thumbnail", f"{url}/frames/1/rendered"):
            assert http.get(path, params=params).status_code == 400, (path, params)
    for path in ("studies/x/series/y/instances/z/rendered", "studies/x/series/y/thumbnail", "studies/1.2/series/1.3/thumbnail"):
        assert http.get(path).status_code in (400, 404), path


def test_frame_parts_have_the_requested_media_type(http):
    """RFC 2387 / PS3.18 8.7.3.5.3: each part has the `type` of the multipart response; a
    compressed frame asked for as application/octet-stream with transfer-syntax=* is sent
    as stored, labelled application/octet-stream with its transfer syntax."""
    _, ds, url = store_file(http, get_testdata_file("MR_small_jp2klossless.dcm"))
    syntax = ds.file_meta.TransferSyntaxUID
    for accept, part_type in (
        ('multipart/related; type="application/octet-stream"; transfer-syntax=*', f"application/octet-stream; transfer-syntax={syntax}"),
        ('multipart/related; type="image/jp2"', f"image/jp2; transfer-syntax={syntax}"),
    ):
        response = http.get(f"{url}/frames/1", headers={"Accept": accept})
        assert response.status_code == 200, response.text
        assert f'type="{part_type.split(";")[0]}"' in response.headers["content-type"]
        headers = response.content.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        assert f"Content-Type: {part_type}" in headers, (accept, headers)
        assert parts(response)[0][:4] in (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")  # a JPEG 2000 codestream


def test_single_part_dicom_is_for_one_instance(http):
    """PS3.18 10.4.4: Accept: application/dicom (single part) answers an Instance resource
    with the instance as the body; a study or series has no single-part form (406)."""
    data, ds, url = store_file(http, get_testdata_file("MR_small_jp2klossless.dcm"))
    study = f"studies/{ds.StudyInstanceUID}"
    single = http.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert single.status_code == 200, single.text
    assert single.headers["content-type"] == f"application/dicom; transfer-syntax={ds.file_meta.TransferSyntaxUID}"
    assert single.content == data
    decoded = http.get(url, headers={"Accept": "application/dicom"})
    assert decoded.headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    assert pydicom.dcmread(io.BytesIO(decoded.content)).SOPInstanceUID == ds.SOPInstanceUID
    for resource in (study, f"{study}/series/{ds.SeriesInstanceUID}"):
        assert http.get(resource, headers={"Accept": "application/dicom"}).status_code == 406
        either = http.get(resource, headers={"Accept": 'application/dicom, multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert either.headers["content-type"].startswith("multipart/related") and parts(either) == [data]


def test_implicit_vr_is_not_offered(http):
    """PS3.18 8.7.3: Implicit VR Little Endian is not used by web services: asking for it
    is 406, whether the instance would be transcoded or is stored in it."""
    implicit = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'}
    for name in ("CT_small.dcm", "MR_small_implicit.dcm"):
        _, ds, url = store_file(http, get_testdata_file(name))
        assert http.get(url, headers=implicit).status_code == 406, (name, ds.file_meta.TransferSyntaxUID)


def part_headers(response):
    """The header lines of each part of a multipart/related response."""
    boundary = [p.split("=", 1)[1].strip('"') for p in response.headers["content-type"].split(";") if p.strip().startswith("boundary=")][0]
    chunks = response.content.split(b"--" + boundary.encode())[1:-1]
    return [chunk.split(b"\r\n\r\n", 1)[0].decode().strip().split("\r\n") for chunk in chunks]


def test_implicit_vr_instance_asked_for_as_stored_comes_in_explicit_vr(http, dicomweb):
    """PS3.18 8.7.3: web services shall not use Implicit VR Little Endian, so an instance
    stored in it that is asked for with transfer-syntax=* ("any") is sent in Explicit VR
    Little Endian, the default web syntax (8.7.3.4; the syntax may differ per part,
    8.7.8.2), labelled so, the same SOP Instance; a compressed instance beside it is still
    sent as stored. QIDO's AvailableTransferSyntaxUID names what the web sends."""
    study, series = generate_uid(), generate_uid()
    stored = {}
    for name in ("MR_small_implicit.dcm", "SC_rgb_jpeg_gdcm.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out)
        stored[ds.SOPInstanceUID] = (ds, out.getvalue())
        body, content_type = multipart_body([out.getvalue()])
        assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    implicit, jpeg = stored
    original = stored[implicit][0]
    expected = {implicit: "1.2.840.10008.1.2.1", jpeg: stored[jpeg][0].file_meta.TransferSyntaxUID}
    instance = f"studies/{study}/series/{series}/instances/{implicit}"
    for resource in (f"studies/{study}", f"studies/{study}/series/{series}", instance):
        response = http.get(resource, headers=DICOM_ANY)
        assert response.status_code == 200, response.text
        assert "content-length" not in response.headers  # a transcoded part's length is not known up front
        for headers, body in zip(part_headers(response), parts(response)):
            ds = pydicom.dcmread(io.BytesIO(body))
            sop = ds.SOPInstanceUID
            assert f"Content-Type: application/dicom; transfer-syntax={expected[sop]}" in headers, (resource, headers)
            assert ds.file_meta.TransferSyntaxUID == expected[sop] and ds.file_meta.MediaStorageSOPInstanceUID == sop
            if sop == jpeg:
                assert body == stored[jpeg][1]  # as stored
                continue
            assert ds.original_encoding == (False, True)  # explicit VR, little endian, really
            assert np.array_equal(ds.pixel_array, original.pixel_array) and ds.PatientName == original.PatientName
    single = http.get(instance, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert single.headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    assert pydicom.dcmread(io.BytesIO(single.content)).original_encoding == (False, True)
    # dicomweb-client asks for transfer-syntax=* at each level
    any_syntax = (("application/dicom", "*"),)
    for datasets in (
        dicomweb.retrieve_study(study, media_types=any_syntax),
        dicomweb.retrieve_series(study, series, media_types=any_syntax),
        [dicomweb.retrieve_instance(study, series, implicit, media_types=any_syntax)],
    ):
        assert {ds.SOPInstanceUID: ds.file_meta.TransferSyntaxUID for ds in datasets} == {
            sop: syntax for sop, syntax in expected.items() if sop in {ds.SOPInstanceUID for ds in datasets}
        }
    found = http.get(f"studies/{study}/instances", params={"SOPInstanceUID": implicit}).json()
    assert found[0]["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]
    # the pixel data's bulk data URI gives the same (little endian) bytes either way
    bulk = http.get(instance + "/metadata").json()[0]["7FE00010"]["BulkDataURI"]
    assert parts(http.get(bulk)) == [original.PixelData]


def test_retrieval_as_stored_gives_its_length(http, dicomweb):
    """A study or series sent as stored has a Content-Length (the sum of its parts, no
    chunked framing), and the body is exactly that long and intact."""
    study, series = generate_uid(), generate_uid()
    stored = {}
    for number, name in enumerate(("CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_gdcm.dcm")):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out)
        stored[ds.SOPInstanceUID] = out.getvalue()
    body, content_type = multipart_body(list(stored.values()))
    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    for resource in (f"studies/{study}", f"studies/{study}/series/{series}"):
        response = http.get(resource, headers=DICOM_ANY)
        assert int(response.headers["content-length"]) == len(response.content), resource
        assert "transfer-encoding" not in response.headers
        assert sorted(parts(response)) == sorted(stored.values())
    retrieved = dicomweb.retrieve_study(study, media_types=(("application/dicom", "*"),))
    assert {ds.SOPInstanceUID for ds in retrieved} == set(stored)


def test_as_stored_needs_transcoding_within_the_limit():
    """An Implicit VR instance too large to transcode cannot be sent for transfer-syntax=*
    (it may not be sent as stored): 406 unless another acceptable syntax is possible."""
    from server.dicom import wado
    from server.store.blobs import BlobKey

    def stored(syntax, size):
        return wado.Stored("1.2", "1.3", "1.4", BlobKey("1.2", "1.3", "1.4", "0" * 32), size, syntax, "1.2.840.10008.5.1.4.1.1.4")

    small, large = stored(wado.IMPLICIT_LE, 1000), stored(wado.IMPLICIT_LE, wado.TRANSCODE_MAX_BYTES + 1)
    assert wado.choose_syntax([small], ["*"]) == "*"
    assert wado.sent_syntax(small, "*") == wado.EXPLICIT_LE
    assert wado.sent_syntax(stored(wado.RLE, 1000), "*") == wado.RLE
    with pytest.raises(wado.NotAcceptable):
        wado.choose_syntax([large], ["*", wado.EXPLICIT_LE])


# pydicom's Explicit VR Big Endian test files: 16 bits, 32 bits over 15 frames, 8 bits in OW
# (odd length) and 8 bits in OW with palette lookup tables (OW) over 2 frames.
BIG_ENDIAN_FILES = ("MR_small_bigendian.dcm", "rtdose_expb.dcm", "SC_rgb_small_odd_big_endian.dcm", "OBXXXX1A_expb_2frame.dcm")
EXPLICIT_LE = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"


def big_endian_study(http):
    """The Big Endian test files stored in one series: (study, series, {sop: original})."""
    study, series, stored = generate_uid(), generate_uid(), {}
    for name in BIG_ENDIAN_FILES:
        ds = pydicom.dcmread(get_testdata_file(name))
        assert ds.file_meta.TransferSyntaxUID == BIG_ENDIAN, name
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out)
        body, content_type = multipart_body([out.getvalue()])
        assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
        stored[ds.SOPInstanceUID] = pydicom.dcmread(io.BytesIO(out.getvalue()))
    return study, series, stored


def assert_little_endian_copy(body, original):
    """`body` is `original` re-encoded in Explicit VR Little Endian: same instance, same
    element values (words swapped), same pixels."""
    ds = pydicom.dcmread(io.BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE and ds.original_encoding == (False, True)
    assert ds.SOPInstanceUID == original.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.Rows == original.Rows and ds.Columns == original.Columns and ds.PatientName == original.PatientName
    assert np.array_equal(ds.pixel_array, original.pixel_array), original.SOPInstanceUID
    for keyword in ("RedPaletteColorLookupTableData", "RedPaletteColorLookupTableDescriptor"):
        if keyword in original:
            assert ds[keyword].value == original[keyword].value or np.array_equal(
                np.frombuffer(ds[keyword].value, "<u2"), np.frombuffer(original[keyword].value, ">u2")
            ), keyword
    return ds


def test_big_endian_instance_comes_in_explicit_vr_little_endian(http, dicomweb):
    """PS3.18 8.7.3: web services shall not use Explicit VR Big Endian (retired): an instance
    stored in it is sent in Explicit VR Little Endian for transfer-syntax=* (labelled so,
    part by part) and when asked for, values and pixel data swapped to little endian; QIDO
    announces that syntax; asking for Big Endian is 406."""
    study, series, stored = big_endian_study(http)
    explicit = {"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}'}
    sop = next(iter(stored))
    instance = f"studies/{study}/series/{series}/instances/{sop}"
    for accept in (DICOM_ANY, explicit):
        for resource in (f"studies/{study}", f"studies/{study}/series/{series}", instance):
            response = http.get(resource, headers=accept)
            assert response.status_code == 200, (resource, accept, response.text)
            bodies = parts(response)
            assert len(bodies) == (1 if resource == instance else len(stored))
            for headers, body in zip(part_headers(response), bodies):
                assert f"Content-Type: application/dicom; transfer-syntax={EXPLICIT_LE}" in headers, headers
                sent = pydicom.dcmread(io.BytesIO(body))
                assert_little_endian_copy(body, stored[sent.SOPInstanceUID])
    for accept in ("application/dicom; transfer-syntax=*", f"application/dicom; transfer-syntax={EXPLICIT_LE}", "application/dicom"):
        single = http.get(instance, headers={"Accept": accept})
        assert single.status_code == 200, single.text
        assert single.headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
        assert_little_endian_copy(single.content, stored[sop])
    datasets = dicomweb.retrieve_study(study, media_types=(("application/dicom", "*"),))
    assert {ds.SOPInstanceUID: ds.file_meta.TransferSyntaxUID for ds in datasets} == dict.fromkeys(stored, EXPLICIT_LE)
    found = http.get(f"studies/{study}/series/{series}/instances").json()
    assert sorted(item["00083002"]["Value"][0] for item in found) == [EXPLICIT_LE] * len(stored)
    big = {"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={BIG_ENDIAN}'}
    assert http.get(instance, headers=big).status_code == 406


def test_big_endian_frames_are_little_endian(http):
    """PS3.18 8.7.3.5.3: uncompressed frames (application/octet-stream) are little endian,
    whatever the stored byte order: the frames and the pixel data bulk data of a Big Endian
    instance are its pixels swapped (16 and 32 bit values; 8 bit values in OW words, also
    for frames starting on an odd byte)."""
    study, series, stored = big_endian_study(http)
    octets = {"Accept": 'multipart/related; type="application/octet-stream"'}
    for sop, original in stored.items():
        pixels = original.pixel_array
        frames = [pixels] if int(original.get("NumberOfFrames") or 1) == 1 else list(pixels)
        expected = [np.ascontiguousarray(f).astype(f.dtype.newbyteorder("<")).tobytes() for f in frames]
        url = f"studies/{study}/series/{series}/instances/{sop}"
        numbers = ",".join(str(n) for n in range(1, len(frames) + 1))
        for accept in (octets, {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}):
            assert parts(http.get(f"{url}/frames/{numbers}", headers=accept)) == expected, (original.SOPInstanceUID, accept)
        assert parts(http.get(f"{url}/bulkdata/7FE00010")) == expected
        assert parts(http.get(f"{url}/frames/{len(frames)}", headers=octets)) == expected[-1:]


def test_big_endian_bulk_data_is_little_endian(http):
    """An OW value of a Big Endian instance behind a BulkDataURI comes little endian."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    words = np.arange(600, dtype=">u2")
    ds.add_new(0x00281221, "OW", words.tobytes())  # Segmented Red Palette Color LUT Data
    _, ds, url = store_dataset(http, ds)
    uri = http.get(f"{url}/metadata").json()[0]["00281221"]["BulkDataURI"]
    assert parts(http.get(uri)) == [words.astype("<u2").tobytes()]


def test_big_endian_inline_binary_is_little_endian(http):
    """Short OW/OF values of a Big Endian instance (palette LUTs, nested in an item too)
    are InlineBinary in its metadata: little endian, as everything on the web is (PS3.18
    F.2.7 applies PS3.5's byte ordering; 8.7.3 retires Big Endian there)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    words = np.arange(100, dtype=">u2")
    floats = np.linspace(0, 1, 10, dtype=">f4")
    ds.add_new(0x00281201, "OW", words.tobytes())  # Red Palette Color LUT Data
    item = pydicom.Dataset()
    item.add_new(0x00660016, "OF", floats.tobytes())  # Point Coordinates Data
    ds.add_new(0x00660002, "SQ", [item])  # Surface Sequence
    _, ds, url = store_dataset(http, ds)
    metadata = http.get(f"{url}/metadata").json()[0]
    assert base64.b64decode(metadata["00281201"]["InlineBinary"]) == words.astype("<u2").tobytes()
    nested = metadata["00660002"]["Value"][0]["00660016"]["InlineBinary"]
    assert base64.b64decode(nested) == floats.astype("<f4").tobytes()


def test_big_endian_without_little_endian_form_is_406_up_front(http):
    """A Big Endian instance whose pixel cells have no little endian form (24 bits allocated)
    is 406 before anything is sent (for '*' too), never a broken stream; frames too."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 24, 24, 23
    ds.PixelData = bytes(range(48))
    _, ds, url = store_dataset(http, ds)
    study = f"studies/{ds.StudyInstanceUID}"
    for resource in (study, url):
        for accept in (DICOM_ANY, {"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}'}):
            assert http.get(resource, headers=accept).status_code == 406, (resource, accept)
    assert http.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"}).status_code == 406
    assert http.get(f"{url}/frames/1", headers={"Accept": 'multipart/related; type="application/octet-stream"'}).status_code == 406


def test_rle_for_pixels_rle_cannot_hold_is_406_up_front(http):
    """RLE Lossless holds pixel cells of 8 or 16 bits here (pydicom's encoding profiles,
    PS3.5 8.2.2): asked for RLE, a 32-bit dose grid is 406 before anything is sent, never a
    stream broken after its 200; as stored it still comes."""
    data, ds, url = store_file(http, get_testdata_file("rtdose_1frame.dcm"))
    assert ds.BitsAllocated == 32
    rle = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.5'}
    for resource in (f"studies/{ds.StudyInstanceUID}", url):
        assert http.get(resource, headers=rle).status_code == 406, resource
    assert http.get(url, headers=DICOM_ANY).status_code == 200


@pytest.mark.parametrize("uid", ["%00", "%ED%A0%80", "%E6%97%A5", "1.2%0A3"])
def test_invalid_uids_in_paths_are_400_with_an_ascii_warning(http, uid):
    study = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
    for method, path in [("GET", f"studies/{uid}"), ("GET", f"studies/{uid}/metadata"),
                         ("DELETE", f"studies/{uid}"), ("GET", f"studies/{study}/series/{uid}/thumbnail"),
                         ("GET", f"studies/{study}/series/{uid}/instances/{uid}/frames/1")]:
        response = http.request(method, path)
        assert response.status_code == 400, (method, path, response.status_code)
        assert response.headers["Warning"].startswith("299 ") and response.headers["Warning"].isascii()
    # the 405 and 404 messages quote the path
    for method, path, status in [("DELETE", f"studies/{uid}/metadata", 405), ("GET", f"no-such/{uid}", 404)]:
        response = http.request(method, path)
        assert response.status_code == status, (method, path, response.status_code)
        assert response.headers["Warning"].startswith("299 ") and response.headers["Warning"].isascii()


def test_a_boundary_longer_than_rfc_2046_allows_is_400(http):
    """RFC 2046 5.1.1 limits a multipart boundary to 70 characters; past 256 python-multipart
    raised an error of its own, a 500."""
    for length, status in ((300, 400), (71, 400), (70, 200)):
        body, content_type = multipart_body([encode(ct_instance(size=8))], boundary="b" * length)
        response = http.post("studies", content=body, headers={"Content-Type": content_type})
        assert response.status_code == status, (length, response.text)
        if status == 400:
            assert "70" in response.headers["Warning"]


def test_bulk_data_is_what_the_metadata_promises(http):
    """A bulkdata URI serves a value the metadata gives a BulkDataURI for, as little endian
    octets (PS3.18 8.7.3.3) whatever the instance's encoding; any other tag is 404. For a
    Big Endian instance PatientName was a 500 (bytes of a PersonName), Rows 64 NUL bytes
    (bytes(64)), and a long FL value a 500 (bytes of a list of floats)."""
    values = np.linspace(-1, 1, 300, dtype=np.float32)
    words = np.arange(600, dtype=np.uint16)
    big = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    big.add_new(0x00700022, "FL", [float(v) for v in values])  # Graphic Data, 1200 bytes: bulk data
    big.add_new(0x00281221, "OW", words.astype(">u2").tobytes())  # Segmented Red Palette Color LUT Data
    deflated = ct_instance(size=8)
    deflated.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    deflated.add_new(0x00281221, "OW", words.astype("<u2").tobytes())
    lut = {"00281221": words.astype("<u2").tobytes()}
    for ds, promised in ((big, {"00700022": values.astype("<f4").tobytes(), **lut}), (deflated, lut)):
        _, ds, url = store_dataset(http, ds)
        metadata = http.get(f"{url}/metadata").json()[0]
        for tag, value in promised.items():
            assert parts(http.get(metadata[tag]["BulkDataURI"])) == [value], (ds.file_meta.TransferSyntaxUID, tag)
        for tag in ("00100010", "00280010", "00700023"):  # PatientName, Rows (in the metadata), absent
            assert http.get(f"{url}/bulkdata/{tag}").status_code == 404, (ds.file_meta.TransferSyntaxUID, tag)


def jpeg_instance(frames: list[bytes]):
    """pydicom's JPEG Lossless RGB image with `frames` (encapsulated JPEG codestreams) as its
    frames: its own frame, or one no decoder takes (b"\\xff\\xd8\\xff\\xd9")."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    good = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate([good if frame is None else frame for frame in frames])
    return ds


BROKEN_FRAME = b"\xff\xd8\xff\xd9"  # a JPEG with nothing between start and end of image
OCTETS = {"Accept": 'multipart/related; type="application/octet-stream"'}


def test_frames_that_cannot_be_decoded_are_406_or_sent_as_stored(http):
    """A frame the installed decoders cannot decode (12-bit JPEG Extended; a broken
    codestream) is 406 when asked for uncompressed, and sent as stored (image/jpeg) when any
    type is accepted (*/*): a 500 before. Frames are decoded before the response starts: a
    broken 17th frame (past the frames answered from memory) dropped the connection after
    the 200."""
    _, _, lossy = store_file(http, get_testdata_file("JPEG-lossy.dcm"))
    _, ds, broken = store_dataset(http, jpeg_instance([None] * 16 + [BROKEN_FRAME]))
    all_frames = ",".join(str(n) for n in range(1, 18))
    for url in (f"{lossy}/frames/1", f"{broken}/frames/{all_frames}", f"{broken}/frames/17", f"{broken}/bulkdata/7FE00010"):
        assert http.get(url, headers=OCTETS).status_code == 406, url
        for accept in ("*/*", "multipart/related", f'{OCTETS["Accept"]}, multipart/related; type="image/jpeg"'):
            response = http.get(url, headers={"Accept": accept})
            assert response.status_code == 200, (url, accept, response.text)
            assert 'type="image/jpeg"' in response.headers["content-type"], url
            assert all(part.startswith(b"\xff\xd8") for part in parts(response)), url
    decoded = parts(http.get(f"{broken}/frames/{all_frames[:-3]}", headers=OCTETS))  # frames 1 to 16 decode
    assert len(decoded) == 16 and len(decoded[0]) == ds.Rows * ds.Columns * 3


def test_a_frame_list_names_each_frame_once(http):
    """PS3.18's frame list is "one or more non duplicate frame numbers": a frame named twice
    is 400, so a list asks for at most the instance's frames (5000 times frame 1 streamed
    5000 copies, decoding each)."""
    _, _, url = store_dataset(http, jpeg_instance([None, None]))
    assert len(parts(http.get(f"{url}/frames/2,1", headers=OCTETS))) == 2
    for frames in ("1,1", "1,2,1", ",".join(["1"] * 5000)):
        response = http.get(f"{url}/frames/{frames}", headers=OCTETS)
        assert response.status_code == 400, frames[:20]
        assert "more than once" in response.headers["Warning"]


def without_pixel_data():
    ds = ct_instance(size=8)
    del ds.PixelData
    return ds


def with_attribute(keyword, value):
    ds = ct_instance(size=8)
    setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "make,syntax",
    [
        (lambda: pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm")), EXPLICIT_LE),  # no decoder for 12-bit JPEG Extended
        (lambda: jpeg_instance([None, BROKEN_FRAME]), EXPLICIT_LE),
        (lambda: with_attribute("PhotometricInterpretation", "FOO"), "1.2.840.10008.1.2.5"),
        (lambda: with_attribute("BitsStored", 0), "1.2.840.10008.1.2.5"),
        (without_pixel_data, "1.2.840.10008.1.2.5"),
    ],
    ids=["12-bit-jpeg-extended", "broken-frame", "photometric-foo", "bits-stored-0", "no-pixel-data"],
)
def test_instances_that_cannot_be_transcoded_are_406_up_front(http, make, syntax):
    """An instance that cannot be transcoded to the syntax it would be sent in (its pixel
    data cannot be decoded, or the encoder refuses its attributes) is 406 naming it before
    anything is sent, at every level: each was a 200 whose body broke off."""
    _, ds, url = store_dataset(http, make())
    study = f"studies/{ds.StudyInstanceUID}"
    other = ct_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, size=8)  # one that can be, beside it
    body, content_type = multipart_body([encode(other)])
    assert http.post(f"{study}", content=body, headers={"Content-Type": content_type}).status_code == 200
    for resource in (study, f"{study}/series/{ds.SeriesInstanceUID}", url):
        response = http.get(resource, headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'})
        assert response.status_code == 406, (resource, response.status_code)
        assert ds.SOPInstanceUID in response.headers["Warning"]
    assert http.get(url, headers={"Accept": f"application/dicom; transfer-syntax={syntax}"}).status_code == 406
    assert http.get(study, headers=DICOM_ANY).status_code == 200  # as stored, it comes


@pytest.mark.parametrize(
    "keyword,value",
    [
        ("WindowWidth", 0),
        ("WindowWidth", -400),
        ("VOILUTFunction", "FOO"),
        ("ModalityLUTSequence", [pydicom.Dataset()]),  # an item without its LUT Descriptor
    ],
)
def test_stored_display_hints_that_cannot_be_used_are_ignored_when_rendering(http, keyword, value):
    """A stored window or Modality LUT pydicom cannot apply is ignored, as a viewer would:
    the image is rendered over the range of its values (a 500 before)."""
    from PIL import Image

    _, ds, url = store_dataset(http, with_attribute(keyword, value))
    for path in (f"{url}/rendered", f"{url}/thumbnail", f"{url}/frames/1/rendered",
                 f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/thumbnail"):
        response = http.get(path, headers={"Accept": "image/png"})
        assert response.status_code == 200, (path, response.text)
        pixels = np.asarray(Image.open(io.BytesIO(response.content)))
        assert pixels.min() < pixels.max(), path  # the image, not a blank


def test_rendered_window_is_finite_with_a_positive_width(http, server):
    """PS3.18 8.3.5.1.3: window=center,width,function; NaN or infinite numbers, a width of 0
    or less and an unknown function are 400 (they gave 200 with numpy RuntimeWarnings); an
    extreme finite window saturates, without warnings."""
    _, _, url = store_dataset(http, ct_instance(size=8))
    for window in ("nan,nan", "1,inf", "-inf,1", "1,0", "1,-5", "40,400,foo", "40,400,linear,x", "40", "a,b"):
        response = http.get(f"{url}/rendered", params={"window": window})
        assert response.status_code == 400, (window, response.status_code)
    logged = len(server.log_path.read_text(errors="replace"))
    for window in ("-1e308,1e-308", "1e308,1e-308,sigmoid", "-1e308,1e-308,linear-exact", "40,400,LINEAR-EXACT", "40,0.5,sigmoid"):
        response = http.get(f"{url}/rendered", params={"window": window})
        assert response.status_code == 200, (window, response.text)
    assert "RuntimeWarning" not in server.log_path.read_text(errors="replace")[logged:]
