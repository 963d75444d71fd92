"""The one ingest path: every pydicom / pydicom-data test file by STOW-RS (valid ones
stored byte-identical, broken ones refused with a failure reason and no trace), the same
study by STOW-RS and C-STORE at once stored once, idempotency, and a kill -9 mid-STOW."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import threading
import time

import httpx
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as encode_data_set
from pynetdicom.sop_class import CTImageStorage

from server.dicom import wado
from server.dicom.instance import Refused, parse
from tests.conftest import start_server
from tests.dicom.conftest import ct_instance, dicom_port, encode, multipart_body, pydicom_test_files

BROKEN = {  # name -> why pydicom's file is not a valid PS3.10 instance
    "ExplVR_BigEndNoMeta.dcm": "no file meta", "ExplVR_LitEndNoMeta.dcm": "no file meta",
    "OT-PAL-8-face.dcm": "no preamble", "no_meta.dcm": "no file meta", "rtstruct.dcm": "no preamble",
    "MR_truncated.dcm": "truncated pixel data", "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
    "rtplan_truncated.dcm": "truncated", "meta_missing_tsyntax.dcm": "no transfer syntax",
    "SC_rgb_jpeg.dcm": "implicit VR data under an explicit transfer syntax",
    "MR_small_padded.dcm": "pixel data longer than described", "nested_priv_SQ.dcm": "pixel data length",
    "bad_sequence.dcm": "invalid UIDs", "badVR.dcm": "invalid IS value",
    "rtdose.dcm": "meta SOP Instance UID differs", "rtdose_1frame.dcm": "meta differs",
    "rtdose_expb.dcm": "meta differs", "rtdose_expb_1frame.dcm": "meta differs", "rtplan.dcm": "meta differs",
}


def classify():
    valid, refused = [], []
    for path in pydicom_test_files():
        try:
            parsed = parse(path)
        except Refused:
            refused.append(path)
            continue
        valid.append((path, parsed))
    return valid, refused


def wait_for(condition, seconds: float = 10) -> bool:
    """Whether `condition()` holds within `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_test_files_by_stow(http, db):
    valid, refused = classify()
    assert {p.name for p in refused} >= set(BROKEN), "a known-broken file was accepted"
    syntaxes = {parsed.transfer_syntax for _, parsed in valid}
    assert len(syntaxes) >= 10, syntaxes
    for path in [p for p in refused if p.name in BROKEN]:
        body, content_type = multipart_body([path.read_bytes()])
        response = http.post("studies", content=body, headers={"Content-Type": content_type})
        assert response.status_code == 409, path.name
        reason = response.json()["00081198"]["Value"][0]["00081197"]["Value"][0]
        assert reason in (0xC000, 0xA900, 0xC122), (path.name, hex(reason))
    seen = set()
    for path, parsed in valid:
        if parsed.sop in seen:
            continue  # pydicom ships a few files sharing a SOP Instance UID
        seen.add(parsed.sop)
        body, content_type = multipart_body([path.read_bytes()])
        response = http.post("studies", content=body, headers={"Content-Type": content_type})
        if response.status_code == 409 and response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0111]:
            continue  # same UID, other bytes, from an earlier test file
        assert response.status_code == 200, (path.name, response.text)
        retrieved = http.get(
            f"studies/{parsed.study}/series/{parsed.series}/instances/{parsed.sop}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        if parsed.transfer_syntax in wado.NOT_FOR_WEB:  # sent in Explicit VR Little Endian (PS3.18 8.7.3)
            body = retrieved.content.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
            sent = pydicom.dcmread(io.BytesIO(body))
            assert sent.file_meta.TransferSyntaxUID == wado.EXPLICIT_LE, path.name
            assert sent.original_encoding == (False, True) and sent.SOPInstanceUID == parsed.sop, path.name
            continue
        assert path.read_bytes() in retrieved.content, path.name
    # no trace of the refused ones
    refused_sops = set()
    for path in refused:
        try:
            refused_sops.add(str(pydicom.dcmread(path, force=True).get("SOPInstanceUID", "")))
        except Exception:
            pass
    refused_sops -= seen
    assert db.dicom_instances.count_documents({"_id": {"$in": sorted(refused_sops)}}) == 0


def test_idempotent_and_different_bytes_refused(http, db):
    instance = ct_instance()
    body, content_type = multipart_body([encode(instance)])
    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    instance.PatientName = "Other^Name"
    body, content_type = multipart_body([encode(instance)])
    response = http.post("studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0111]
    assert db.dicom_instances.count_documents({"_id": instance.SOPInstanceUID}) == 1
    study = db.dicom_studies.find_one({"_id": instance.StudyInstanceUID})
    assert study["n"] == 1


def test_resend_of_an_instance_stored_under_the_earlier_digest(server, http, db):
    """Blobs stored by earlier builds are named by a 16-digit BLAKE2b digest: the same bytes sent
    again are the same instance (200, the old blob kept), different bytes are still refused."""
    instance = ct_instance()
    body, content_type = multipart_body([encode(instance)])
    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    record = db.dicom_instances.find_one({"_id": instance.SOPInstanceUID})
    root = server.data_dir / "dicom"
    current = root / record["blob"]
    assert len(current.name.split(".")[-2]) == 32  # SHA-256, 128 bits
    start = parse(current).dataset_start
    with open(current, "rb") as handle:
        handle.seek(start)
        legacy_digest = hashlib.blake2b(handle.read(), digest_size=8).hexdigest()
    legacy = current.with_name(f"{instance.SOPInstanceUID}.{legacy_digest}.dcm")
    current.rename(legacy)
    legacy_blob = str(legacy.relative_to(root))
    db.dicom_instances.update_one({"_id": instance.SOPInstanceUID}, {"$set": {"blob": legacy_blob}})

    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    assert db.dicom_instances.find_one({"_id": instance.SOPInstanceUID})["blob"] == legacy_blob
    assert sorted(p.name for p in legacy.parent.iterdir()) == [legacy.name]  # the resend's copy went
    retrieved = http.get(f"studies/{instance.StudyInstanceUID}/series/{instance.SeriesInstanceUID}/instances/"
                         f"{instance.SOPInstanceUID}", headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert retrieved.status_code == 200 and legacy.read_bytes() in retrieved.content
    instance.PatientName = "Other^Name"
    body, content_type = multipart_body([encode(instance)])
    assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 409


def test_study_url_mismatch_and_truncated_body(http, db):
    instance = ct_instance()
    body, content_type = multipart_body([encode(instance)])
    other = generate_uid()
    response = http.post(f"studies/{other}", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    cut = body[: len(body) // 2]
    response = http.post("studies", content=cut, headers={"Content-Type": content_type})
    assert response.status_code in (400, 409)
    assert db.dicom_instances.count_documents({"_id": instance.SOPInstanceUID}) == 0


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is installed by scripts/test")
def test_same_study_by_stow_and_cstore_at_once(server, http, db, tmp_path):
    study, series = generate_uid(), generate_uid()
    instances = [ct_instance(study, series, number=i) for i in range(1, 21)]
    paths = []
    for i, ds in enumerate(instances):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(encode(ds))
        paths.append(path)
    body, content_type = multipart_body([p.read_bytes() for p in paths])
    results = {}

    def stow():
        results["stow"] = http.post("studies", content=body, headers={"Content-Type": content_type}).status_code

    thread = threading.Thread(target=stow)
    thread.start()
    store = subprocess.run(["storescu", "-aec", "KUROSHIO", "127.0.0.1", str(dicom_port(server)), *map(str, paths)],
                           capture_output=True, text=True, timeout=120)
    thread.join()
    assert store.returncode == 0, store.stderr
    assert results["stow"] == 200
    assert db.dicom_instances.count_documents({"st": study}) == 20
    doc = db.dicom_studies.find_one({"_id": study})
    assert doc["n"] == 20 and doc["nser"] == 1
    assert db.dicom_series.find_one({"_id": series})["n"] == 20


def test_kill_during_stow_leaves_acknowledged_retrievable(mongod, tmp_path, db):
    live = start_server(mongod.uri, tmp_path / "killed")
    study = generate_uid()
    acknowledged: list[str] = []
    batches = [[ct_instance(study, number=b * 10 + i, size=128) for i in range(10)] for b in range(20)]

    def send():
        with httpx.Client(base_url=f"{live.base_url}/dicomweb/", timeout=30) as client:
            for batch in batches:
                body, content_type = multipart_body([encode(ds) for ds in batch])
                try:
                    response = client.post("studies", content=body, headers={"Content-Type": content_type})
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    acknowledged.extend(ds.SOPInstanceUID for ds in batch)

    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    live.process.kill()
    live.process.wait()
    thread.join()
    assert 50 <= len(acknowledged) < 200
    restarted = start_server(mongod.uri, tmp_path / "killed")
    try:
        with httpx.Client(base_url=f"{restarted.base_url}/dicomweb/", timeout=30) as client:
            for sop in acknowledged:
                doc = db.dicom_instances.find_one({"_id": sop}, {"se": 1})
                assert doc is not None
                response = client.get(f"studies/{study}/series/{doc['se']}/instances/{sop}/metadata")
                assert response.status_code == 200
        indexed = list(db.dicom_instances.find({"st": study}, {"blob": 1}))
        for doc in indexed:  # nothing half-indexed: every indexed instance has its bytes
            assert (tmp_path / "killed" / "dicom" / doc["blob"]).is_file()
        study_doc = db.dicom_studies.find_one({"_id": study})
        assert study_doc["n"] == len(indexed)
        assert sum(s["n"] for s in db.dicom_series.find({"st": study})) == len(indexed)
    finally:
        restarted.process.terminate()
        restarted.process.wait(30)


def test_failed_items_name_the_instance(http, db):
    """PS3.18 10.5.3: a FailedSOPSequence item names the instance once its UIDs are known
    (here: the URL's study differs; the file meta's SOP Instance UID differs), and the
    response's RetrieveURL names only a study where something was stored."""
    other_study = ct_instance()
    meta_differs = ct_instance()
    meta_differs.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    study = generate_uid()
    body, content_type = multipart_body([encode(other_study), encode(meta_differs)])
    response = http.post(f"studies/{study}", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 409
    failed = response.json()["00081198"]["Value"]
    assert [(item["00081150"]["Value"], item["00081155"]["Value"]) for item in failed] == [
        ([ds.SOPClassUID], [ds.SOPInstanceUID]) for ds in (other_study, meta_differs)
    ]
    assert "00081190" not in response.json()
    stored = ct_instance(study=study)
    body, content_type = multipart_body([encode(stored), encode(other_study)])
    response = http.post(f"studies/{study}", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 202
    assert response.json()["00081190"]["Value"][0].endswith(f"/studies/{study}")


def test_parts_other_than_application_dicom_are_refused(http, db):
    """PS3.18 10.5.1: STOW-RS parts are application/dicom; a part labelled otherwise is
    refused (0xC000, cannot understand) and not stored, even if it holds DICOM. A part
    without a Content-Type has the request's type."""
    labelled_pdf, labelled_dicom, unlabelled = ct_instance(), ct_instance(), ct_instance()
    boundary = "kuroshio-parts"
    body = b"".join(
        f"--{boundary}\r\n".encode() + header + b"\r\n" + encode(ds) + b"\r\n"
        for header, ds in ((b"Content-Type: application/pdf\r\n", labelled_pdf),
                           (b"Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n", labelled_dicom),
                           (b"", unlabelled))
    ) + f"--{boundary}--\r\n".encode()
    response = http.post("studies", content=body,
                         headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert response.status_code == 202, response.text
    assert [item["00081197"]["Value"] for item in response.json()["00081198"]["Value"]] == [[0xC000]]
    assert len(response.json()["00081199"]["Value"]) == 2
    assert db.dicom_instances.count_documents({"_id": labelled_pdf.SOPInstanceUID}) == 0
    assert db.dicom_instances.count_documents({"_id": {"$in": [labelled_dicom.SOPInstanceUID, unlabelled.SOPInstanceUID]}}) == 2


def test_an_instance_that_cannot_be_written_is_refused_without_trace(server, http, db):
    """A blob that cannot be made durable (here its study's directory is taken by a file) is
    refused with 0xA700 (Out of Resources) by STOW-RS and C-STORE alike: nothing indexed,
    no staging file left, and the same instances are stored once the disk allows it. The
    index transaction's writes run while the bytes are fsynced; this is the case where
    they must not be committed."""
    study = generate_uid()
    instances = [ct_instance(study=study) for _ in range(2)]
    root = server.data_dir / "dicom"
    blocker = root / study
    blocker.write_bytes(b"not a directory")
    try:
        body, content_type = multipart_body([encode(ds) for ds in instances])
        response = http.post("studies", content=body, headers={"Content-Type": content_type})
        assert response.status_code == 409, response.text
        failed = response.json()["00081198"]["Value"]
        assert [item["00081197"]["Value"] for item in failed] == [[0xA700], [0xA700]]
        ae = AE()
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", dicom_port(server), ae_title="KUROSHIO")
        assert assoc.is_established
        status = assoc.send_c_store(instances[0])
        assoc.release()
        assert status.Status == 0xA700
        assert db.dicom_instances.count_documents({"st": study}) == 0
        assert db.dicom_studies.count_documents({"_id": study}) == 0
        assert db.dicom_series.count_documents({"st": study}) == 0
        assert wait_for(lambda: not any((root / ".incoming").iterdir()))
    finally:
        blocker.unlink()
    response = http.post("studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert db.dicom_studies.find_one({"_id": study})["n"] == 2


def test_a_cstore_cut_off_half_way_leaves_no_file(server, db):
    """pynetdicom writes a C-STORE's data set to a file as its PDUs arrive. That file is
    among the blob store's staging files (so staging links it, never copies it out of a
    /tmp on another file system), and it is deleted when the association ends before the
    data set does, as it is once a whole one has been stored."""
    incoming = server.data_dir / "dicom" / ".incoming"
    ds = ct_instance(size=256)
    ae = AE()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", dicom_port(server), ae_title="KUROSHIO")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = io.BytesIO(encode_data_set(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16_384))
    assert len(fragments) > 4
    for fragment in fragments[:-1]:  # all but the last piece of the data set
        assoc.dul.send_pdu(fragment)
    assert wait_for(lambda: any(path.stat().st_size > 64_000 for path in incoming.glob("dimse-*")))
    assoc.abort()
    assert wait_for(lambda: not any(incoming.glob("dimse-*")))
    assert db.dicom_instances.count_documents({"_id": ds.SOPInstanceUID}) == 0

    assoc = ae.associate("127.0.0.1", dicom_port(server), ae_title="KUROSHIO")
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    assert db.dicom_instances.count_documents({"_id": ds.SOPInstanceUID}) == 1
    assert not any(incoming.iterdir())
