"""DIMSE with dcmtk's tools against the live server's AE: C-ECHO, C-STORE of pydicom's
test files (every transfer syntax among the valid ones), C-FIND at every level, C-GET and
C-MOVE (to a storescp started here) returning the bytes that were sent."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from server.dicom import dimse, qido
from server.dicom.archive import Archive
from server.dicom.dimse import ApplicationEntity
from server.dicom.instance import dataset_start
from server.store.database import Store
from server.store.mongod import free_port
from tests.conftest import start_server, stop_server
from tests.dicom.conftest import ct_instance, dicom_port, encode, multipart_body
from tests.dicom.test_wado import assert_little_endian_copy, big_endian_study

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is installed by scripts/test")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_echo(server):
    result = run("echoscu", "-aec", "KUROSHIO", "127.0.0.1", str(dicom_port(server)))
    assert result.returncode == 0, result.stderr


def write_study(directory: Path, count: int = 3, patient_id: str = "DIMSE-1") -> tuple[str, str, list[Path]]:
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        path = directory / f"{number}.dcm"
        path.write_bytes(encode(ct_instance(study, series, number=number, patient_id=patient_id, patient_name="Müller^Jörg")))
        paths.append(path)
    return study, series, paths


def dataset_bytes(path: Path) -> bytes:
    """The data set part of a PS3.10 file (what DIMSE transfers), without the meta."""
    with open(path, "rb") as handle:
        return path.read_bytes()[dataset_start(handle.fileno()):]


def test_store_find_get_move(server, tmp_path, dicomweb):
    port = str(dicom_port(server))
    study, series, paths = write_study(tmp_path)
    result = run("storescu", "-aec", "KUROSHIO", "127.0.0.1", port, *map(str, paths))
    assert result.returncode == 0, result.stderr
    assert len(dicomweb.search_for_instances(study)) == 3

    for level, keys in {
        "PATIENT": ["-P", "-k", "PatientID=DIMSE-1", "-k", "PatientName"],
        "STUDY": ["-S", "-k", f"StudyInstanceUID={study}", "-k", "ModalitiesInStudy", "-k", "NumberOfStudyRelatedInstances"],
        "SERIES": ["-S", "-k", f"StudyInstanceUID={study}", "-k", "SeriesInstanceUID", "-k", "Modality=CT"],
        "IMAGE": ["-S", "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}", "-k", "SOPInstanceUID"],
    }.items():
        out = tmp_path / f"find-{level}"
        out.mkdir()
        result = run("findscu", "-aec", "KUROSHIO", *keys, "-k", f"QueryRetrieveLevel={level}", "-X", "-od", str(out), "127.0.0.1", port)
        assert result.returncode == 0, result.stderr
        answers = [pydicom.dcmread(p) for p in sorted(out.iterdir())]
        assert answers, level
        if level == "IMAGE":
            assert len(answers) == 3
        if level == "STUDY":
            assert answers[0].NumberOfStudyRelatedInstances == 3
        if level == "PATIENT":
            assert str(answers[0].PatientName) == "Müller^Jörg"

    got = tmp_path / "get"
    got.mkdir()
    result = run("getscu", "-aec", "KUROSHIO", "+xe", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                 "-od", str(got), "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    retrieved = {pydicom.dcmread(p).SOPInstanceUID: p for p in got.iterdir()}
    for path in paths:
        sent = pydicom.dcmread(path)
        assert dataset_bytes(retrieved[sent.SOPInstanceUID]) == dataset_bytes(path)



def test_find_patient_level_counts_its_studies_series_and_instances(server, tmp_path):
    """PS3.4 C.6.1.1.2: Number of Patient Related Studies, Series and Instances, each the
    sum over the patient's studies (series and instances were returned empty)."""
    port = str(dicom_port(server))
    patient = f"DIMSE-COUNT-{uuid.uuid4().hex[:8]}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = write_study(tmp_path / "a", 2, patient_id=patient)[2] + write_study(tmp_path / "b", 1, patient_id=patient)[2]
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", port, *map(str, paths)).returncode == 0
    out = tmp_path / "found"
    out.mkdir()
    result = run("findscu", "-aec", "KUROSHIO", "-P", "-k", "QueryRetrieveLevel=PATIENT", "-k", f"PatientID={patient}",
                 "-k", "NumberOfPatientRelatedStudies", "-k", "NumberOfPatientRelatedSeries",
                 "-k", "NumberOfPatientRelatedInstances", "-X", "-od", str(out), "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    [answer] = [pydicom.dcmread(p) for p in out.iterdir()]
    assert (answer.NumberOfPatientRelatedStudies, answer.NumberOfPatientRelatedSeries,
            answer.NumberOfPatientRelatedInstances) == (2, 2, 3)



def test_dimse_messages_leave_no_patient_data_in_the_server_log(server, tmp_path):
    """pynetdicom logs every DIMSE message at INFO, C-FIND identifiers included: patient
    names and IDs in a plain log file. The audit trail records each operation instead."""
    port = str(dicom_port(server))
    patient = f"LOGGED-{uuid.uuid4().hex[:8]}"
    paths = write_study(tmp_path, 1, patient_id=patient)[2]
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", port, *map(str, paths)).returncode == 0
    result = run("findscu", "-aec", "KUROSHIO", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient}",
                 "-k", "PatientName", "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    time.sleep(0.5)
    log = server.log_path.read_text(errors="replace")
    assert patient not in log and "Müller" not in log
    assert "Association" in log  # association-level lines stay


class Peer:
    """A pynetdicom Storage SCP, AE title PEER, that accepts every Storage SOP Class in every
    transfer syntax (preferring Explicit VR Little Endian): what it received (SOP Instance UID -> SOP class, transfer syntax) and
    the presentation contexts of each association it accepted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, tuple[str, str]] = {}
        self.associations: list[list[tuple[str, str]]] = []
        self.ae = AE(ae_title="PEER")
        for sop_class in dimse.STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, dimse.TRANSFER_SYNTAXES)  # Explicit VR Little Endian first
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_ACCEPTED, self.on_accepted)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def on_accepted(self, event: evt.Event) -> None:
        self.associations.append(
            [(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in event.assoc.accepted_contexts]
        )

    def on_store(self, event: evt.Event) -> int:
        self.received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.abstract_syntax), str(event.context.transfer_syntax))
        return 0x0000


@pytest.fixture(scope="module")
def peer():
    scp = Peer()
    try:
        yield scp
    finally:
        scp.server.shutdown()


@pytest.fixture(scope="module")
def mover(mongod, tmp_path_factory, peer):
    """A server whose C-MOVE destination DEST is a default dcmtk storescp (which accepts
    the uncompressed transfer syntaxes only), and the directory it writes to; PEER, the
    `peer` fixture, is its other destination; GONE is known but nothing listens there."""
    root = tmp_path_factory.mktemp("move")
    destination_port = free_port()
    received = root / "received"
    received.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(received), "+B", str(destination_port)])
    remotes = f"DEST@127.0.0.1:{destination_port},PEER@127.0.0.1:{peer.port},GONE@127.0.0.1:{free_port()}"
    live = start_server(mongod.uri, root / "server", {"KUROSHIO_DICOM_REMOTE_AES": remotes})
    try:
        yield live, received
    finally:
        stop_server(live)
        scp.terminate()
        scp.wait(10)


def received_sops(received: Path, awaited: set[str] = frozenset()) -> set[str]:
    """The SOP Instance UIDs storescp has written (its file names are MODALITY.UID),
    waiting up to 20 s for the `awaited` ones."""
    deadline = time.monotonic() + 20
    while True:
        sops = {path.name.partition(".")[2] for path in received.iterdir()}
        if awaited <= sops or time.monotonic() > deadline:
            return sops
        time.sleep(0.2)


def test_move_to_configured_destination(mover, tmp_path):
    live, received = mover
    port = str(dicom_port(live))
    study, _, paths = write_study(tmp_path, 2)
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", port, *map(str, paths)).returncode == 0
    result = run("movescu", "-aec", "KUROSHIO", "-aem", "DEST", "-S", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={study}", "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in paths}
    assert sent <= received_sops(received, sent)
    unknown = run("movescu", "-aec", "KUROSHIO", "-aem", "NOBODY", "-S", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}", "127.0.0.1", port)
    assert "Move Destination unknown" in unknown.stderr + unknown.stdout or unknown.returncode != 0


def identifier(**keys: str) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def c_get(port: int, query: Dataset, model: str = StudyRootQueryRetrieveInformationModelGet) -> tuple[Dataset, list[Dataset]]:
    """A C-GET with pynetdicom (CT Image Storage, uncompressed): the final status and the
    data sets received."""
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)  # read whole: the file can go
        # pynetdicom's C-GET SCU leaves the file it received the data set into (the
        # server's module turns that on for the process: _config.STORE_RECV_CHUNKED_DATASET)
        event.dataset_path.unlink()
        return 0x0000

    ae = AE()
    ae.add_requested_context(model)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="KUROSHIO", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    responses = list(assoc.send_c_get(query, model))
    assoc.release()
    return responses[-1][0], received


def c_move(port: int, query: Dataset, model: str = StudyRootQueryRetrieveInformationModelMove, destination: str = "DEST") -> Dataset:
    """A C-MOVE to `destination` with pynetdicom: the final status."""
    ae = AE()
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="KUROSHIO")
    assert assoc.is_established
    responses = list(assoc.send_c_move(query, destination, model))
    assoc.release()
    return responses[-1][0]


def test_retrieve_takes_unique_keys_only(mover, tmp_path):
    """PS3.4 C.4.2.2.1: a C-MOVE/C-GET identifier holds the unique keys of its level and
    the levels above; anything else is refused (0xA900 with a comment), nothing is sent."""
    live, received = mover
    port = dicom_port(live)
    study, series, paths = write_study(tmp_path, 2)
    (tmp_path / "other").mkdir()
    other, _, other_paths = write_study(tmp_path / "other", 1)
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", str(port), *map(str, paths + other_paths)).returncode == 0
    refused = [
        identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=""),
        identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="*"),
        identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="Müller*"),
        identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study, PatientName="Müller*"),
        identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=study, SeriesInstanceUID=""),
        identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=[study, other], SeriesInstanceUID=series),
    ]
    for query in refused:
        status = c_move(port, query)
        assert status.Status == 0xA900 and status.ErrorComment, query
        status, got = c_get(port, query)
        assert status.Status == 0xA900 and status.ErrorComment and got == [], query
    # above the STUDY level, one unique key (PS3.4 C.4.2.2.1): a list of patients matched nothing, with success
    patients = identifier(QueryRetrieveLevel="PATIENT", PatientID=["DIMSE-1", "DIMSE-2"])
    status = c_move(port, patients, PatientRootQueryRetrieveInformationModelMove)
    assert status.Status == 0xA900 and "PatientID must be a single value" in status.ErrorComment, status
    status, got = c_get(port, patients, PatientRootQueryRetrieveInformationModelGet)
    assert status.Status == 0xA900 and "PatientID must be a single value" in status.ErrorComment and got == [], status
    assert received_sops(received) & {pydicom.dcmread(p).SOPInstanceUID for p in paths + other_paths} == set()
    status, got = c_get(port, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=[study, other], PatientName=""))
    assert status.Status == 0x0000 and len(got) == 3


def test_move_refusal_does_not_depend_on_the_destination(mover, tmp_path):
    """A C-MOVE whose identifier is refused is answered 0xA900 whether or not its destination
    can be reached: pynetdicom associates with the destination before it sends any status,
    so an unreachable one turned the refusal into 0xA801. A good identifier to it is 0xA801."""
    live, _ = mover
    port = dicom_port(live)
    bad = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="*")
    status = c_move(port, bad, destination="GONE")
    assert status.Status == 0xA900 and "StudyInstanceUID" in status.ErrorComment, status
    study, _, paths = write_study(tmp_path, 1)
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", str(port), *map(str, paths)).returncode == 0
    status = c_move(port, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study), destination="GONE")
    assert status.Status == 0xA801, status


def test_several_associations_at_once(server, tmp_path, dicomweb):
    port = str(dicom_port(server))
    jobs = []
    studies = []
    for index in range(4):
        directory = tmp_path / f"a{index}"
        directory.mkdir()
        study, _, paths = write_study(directory, 5)
        studies.append(study)
        jobs.append(subprocess.Popen(["storescu", "-aec", "KUROSHIO", "127.0.0.1", port, *map(str, paths)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    echo = run("echoscu", "-aec", "KUROSHIO", "127.0.0.1", port)  # while the others are open
    assert echo.returncode == 0
    for job in jobs:
        assert job.wait(120) == 0, job.stderr.read() if job.stderr else ""
    for study in studies:
        assert len(dicomweb.search_for_instances(study)) == 5


def test_broken_cstore_is_refused(server, tmp_path, db):
    """A data set whose pixel data is shorter than its description: refused, no trace."""
    ds = ct_instance()
    ds.PixelData = ds.PixelData[:100]
    path = tmp_path / "short.dcm"
    path.write_bytes(encode(ds))
    result = run("storescu", "-aec", "KUROSHIO", "127.0.0.1", str(dicom_port(server)), str(path))
    assert "0xa900" in (result.stdout + result.stderr).lower() or result.returncode != 0
    assert db.dicom_instances.count_documents({"_id": ds.SOPInstanceUID}) == 0


def test_find_declares_utf8(server, tmp_path):
    """PS3.4 C.4.1.1.3.2: responses holding non-ASCII text declare their character set
    (names are answered in UTF-8, ISO_IR 192, whatever they were stored in)."""
    port = str(dicom_port(server))
    name = "Müller^Jürgen=Łukasz"
    ds = ct_instance(patient_id="DIMSE-UTF8", patient_name=name)
    ds.SpecificCharacterSet = "ISO_IR 192"
    path = tmp_path / "utf8.dcm"
    path.write_bytes(encode(ds))
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", port, str(path)).returncode == 0
    for level, model in (("PATIENT", "-P"), ("STUDY", "-S"), ("SERIES", "-S"), ("IMAGE", "-S")):
        out = tmp_path / level
        out.mkdir()
        result = run("findscu", "-aec", "KUROSHIO", model, "-k", f"QueryRetrieveLevel={level}", "-k", "PatientID=DIMSE-UTF8",
                     "-k", "PatientName", "-X", "-od", str(out), "127.0.0.1", port)
        assert result.returncode == 0, result.stderr
        answers = [pydicom.dcmread(p) for p in out.iterdir()]
        assert len(answers) == 1, level
        assert answers[0].SpecificCharacterSet == "ISO_IR 192", level
        assert answers[0].PatientName.original_string == name.encode(), level


def test_find_person_name_without_trailing_empty_components(server, tmp_path):
    """PS3.5 6.2: trailing empty PN components and their carets may be omitted, so a C-FIND
    for "Doe^Jim" finds a patient stored as "DOE^JIM^^^" (and the other way round)."""
    port = str(dicom_port(server))
    patient_id = "DPN-" + generate_uid()[-8:]
    path = tmp_path / "pn.dcm"
    path.write_bytes(encode(ct_instance(patient_id=patient_id, patient_name="DOE^JIM^^^")))
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", port, str(path)).returncode == 0
    for query in ("Doe^Jim", "DOE^JIM^^", "DOE^JIM^^^"):
        out = tmp_path / query.replace("^", "_")
        out.mkdir()
        result = run("findscu", "-aec", "KUROSHIO", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient_id}",
                     "-k", f"PatientName={query}", "-X", "-od", str(out), "127.0.0.1", port)
        assert result.returncode == 0, result.stderr
        assert len(list(out.iterdir())) == 1, query


def test_study_root_has_no_patient_level(mover, tmp_path):
    """PS3.4 C.6.2: Study Root levels are STUDY, SERIES and IMAGE; PATIENT is refused (0xA900)."""
    live, received = mover
    port = dicom_port(live)
    # the servers share the index, not the blobs: a patient of this server only
    _, _, paths = write_study(tmp_path, 1, patient_id="DIMSE-ROOT")
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", str(port), *map(str, paths)).returncode == 0
    query = identifier(QueryRetrieveLevel="PATIENT", PatientID="DIMSE-ROOT")
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="KUROSHIO")
    responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert [status.Status for status, _ in responses] == [0xA900] and "PATIENT" in responses[0][0].ErrorComment
    assert c_move(port, query).Status == 0xA900
    status, got = c_get(port, query)
    assert status.Status == 0xA900 and "PATIENT" in status.ErrorComment and got == []
    status, got = c_get(port, query, PatientRootQueryRetrieveInformationModelGet)
    assert status.Status == 0x0000 and len(got) == 1


@contextlib.contextmanager
def entity_in_this_process(mongod, tmp_path: Path) -> Iterator[tuple[ApplicationEntity, int]]:
    """Our AE started in the test's process (so that a test can look inside it or change
    a setting), on an event loop of its own and a real, private database: (AE, port)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    database = f"kuroshio_ae_{uuid.uuid4().hex[:8]}"
    store = asyncio.run_coroutine_threadsafe(Store.open(mongod.uri, database), loop).result()
    entity = ApplicationEntity(Archive(store, tmp_path / "blobs"), "KUROSHIO", {}, loop)
    port = free_port()
    entity.start("127.0.0.1", port)
    try:
        yield entity, port
    finally:
        entity.stop()
        asyncio.run_coroutine_threadsafe(store.client.drop_database(database), loop).result()
        asyncio.run_coroutine_threadsafe(store.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)


def test_find_past_the_limit_says_so(mongod, tmp_path, monkeypatch):
    """A C-FIND with more matches than the server answers (qido.MAX_LIMIT, 2 here) sends
    the ones it can and ends with 0xA700 (Out of Resources) and a comment, not Success
    (PS3.4 C.4.1: Success says a response was sent for every match). The AE runs in this
    process so that the limit can be lowered; its store is a real, private database."""
    monkeypatch.setattr(qido, "MAX_LIMIT", 2)
    with entity_in_this_process(mongod, tmp_path) as (_, port):
        study, _, paths = write_study(tmp_path, 3)
        assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", str(port), *map(str, paths)).returncode == 0
        ae = AE()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", port, ae_title="KUROSHIO")
        for sop, expected in (("", [0xFF00, 0xFF00, 0xA700]), (pydicom.dcmread(paths[0]).SOPInstanceUID, [0xFF00, 0x0000])):
            query = identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID=study, SOPInstanceUID=sop)
            responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
            assert [status.Status for status, _ in responses] == expected
            assert ("ErrorComment" in responses[-1][0]) == (expected[-1] == 0xA700)
        assoc.release()


def test_the_acceptor_never_stops_the_process_to_collect_garbage(mongod, tmp_path, monkeypatch):
    """pynetdicom's accept loop ran a full gc.collect() every 60 polls (30 s), which froze
    every thread of the server process, the HTTP event loop too, for about 170 ms. The
    server that `start` runs answers a C-ECHO and polls 120 times without collecting."""
    collections: list[object] = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or 0)
    with entity_in_this_process(mongod, tmp_path) as (entity, port):
        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="KUROSHIO")
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert entity.server is not None
        for _ in range(120):
            entity.server.service_actions()  # what serve_forever calls after each poll
    assert collections == []


def test_each_association_negotiates_over_its_own_copy_of_the_supported_contexts(mongod, tmp_path):
    """pynetdicom deep-copies the acceptor's contexts for each association; ours copies
    them without their (immutable) UIDs, for speed, and must still give each association
    contexts it may change without changing the server's or another association's."""
    with entity_in_this_process(mongod, tmp_path) as (entity, port):
        assert entity.server is not None
        served = {(str(cx.abstract_syntax), tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role)
                  for cx in entity.server.contexts}
        ae = AE()
        ae.add_requested_context(CTImageStorage, [RLELossless, ExplicitVRLittleEndian])
        first = ae.associate("127.0.0.1", port, ae_title="KUROSHIO")
        second = ae.associate("127.0.0.1", port, ae_title="KUROSHIO")
        try:
            assert first.is_established and second.is_established
            assert [str(cx.transfer_syntax[0]) for cx in first.accepted_contexts] == [ExplicitVRLittleEndian]
            acceptors = [a for a in entity.server.active_associations if a.is_acceptor]
            assert len(acceptors) == 2
            copies = [a.acceptor.supported_contexts for a in acceptors]
            for contexts in copies:
                assert {(str(cx.abstract_syntax), tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role)
                        for cx in contexts} == served
            originals = {id(cx) for cx in entity.server.contexts} | {id(cx.transfer_syntax) for cx in entity.server.contexts}
            for contexts in copies:
                assert not originals & ({id(cx) for cx in contexts} | {id(cx.transfer_syntax) for cx in contexts})
            assert not {id(cx) for cx in copies[0]} & {id(cx) for cx in copies[1]}
        finally:
            first.release()
            second.release()


def test_compressed_instances_reach_peers_that_take_uncompressed_only(mover, tmp_path):
    """A JPEG 2000 instance retrieved by C-MOVE to a default storescp and by a default
    getscu (both accept uncompressed syntaxes only) arrives decoded: same SOP Instance UID,
    same pixels, an uncompressed transfer syntax."""
    live, received = mover
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    body, content_type = multipart_body([encode(ds)])
    assert httpx.post(f"{live.base_url}/dicomweb/studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    port = str(dicom_port(live))
    keys = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}"]
    result = run("movescu", "-aec", "KUROSHIO", "-aem", "DEST", *keys, "127.0.0.1", port)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    assert ds.SOPInstanceUID in received_sops(received, {ds.SOPInstanceUID})
    moved = next(p for p in received.iterdir() if p.name.endswith(ds.SOPInstanceUID))
    got = tmp_path / "get"
    got.mkdir()
    result = run("getscu", "-aec", "KUROSHIO", *keys, "-od", str(got), "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    for path in (moved, *got.iterdir()):
        arrived = pydicom.dcmread(path)
        assert arrived.SOPInstanceUID == ds.SOPInstanceUID
        assert not arrived.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(arrived.pixel_array, ds.pixel_array)


def test_move_needing_more_than_128_contexts_uses_several_associations(mover, peer):
    """PS3.8 allows 128 presentation contexts an association: a C-MOVE of instances of 70
    SOP classes, each stored in two transfer syntaxes (a context each), needs 140, so the
    server sends them over successive associations to the destination, each with every
    context of the SOP classes it carries. All arrive as stored; the counts are right."""
    live, _ = mover
    study, series = generate_uid(), generate_uid()
    classes = [uid for uid in dimse.STORAGE_SOP_CLASSES if uid != "1.2.840.10008.5.1.4.1.1.77.1.6"][:70]  # not WSI
    sent = {}
    for number, sop_class in enumerate(classes, 1):
        for syntax in (ExplicitVRLittleEndian, RLELossless):
            ds = ct_instance(study, series, number=number, size=8)
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
            if syntax == RLELossless:
                ds.compress(RLELossless, generate_instance_uid=False)
            sent[ds.SOPInstanceUID] = (sop_class, syntax)
            ds.save_as(path := io.BytesIO(), enforce_file_format=True)
            sent[ds.SOPInstanceUID] += (path.getvalue(),)
    body, content_type = multipart_body([data for _, _, data in sent.values()])
    stored = httpx.post(f"{live.base_url}/dicomweb/studies", content=body, headers={"Content-Type": content_type}, timeout=120)
    assert stored.status_code == 200, stored.text
    before = len(peer.associations)
    status = c_move(dicom_port(live), identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study), destination="PEER")
    assert status.Status == 0x0000, status
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations, status.NumberOfWarningSuboperations) == (140, 0, 0)
    assert {sop: peer.received.get(sop) for sop in sent} == {sop: (c, s) for sop, (c, s, _) in sent.items()}
    associations = peer.associations[before:]
    assert len(associations) == 2 and all(len(contexts) <= 128 for contexts in associations)
    for sop_class in classes:  # each SOP class, with both its contexts, in one association
        assert [sum(c == sop_class for c, _ in contexts) for contexts in associations] in ([2, 0], [0, 2]), sop_class


def test_get_sends_in_the_contexts_the_requester_proposed(server):
    """C-GET's sub-operations run on the requester's association, in the Storage contexts
    it proposed (at most 128, with the SCP role): an instance of a SOP class it did not
    propose fails as a sub-operation; the others arrive; the counts say so (0xB000)."""
    study, series = generate_uid(), generate_uid()
    ct, mr = ct_instance(study, series, number=1, size=8), ct_instance(study, series, number=2, size=8)
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    body, content_type = multipart_body([encode(ct), encode(mr)])
    assert httpx.post(f"{server.base_url}/dicomweb/studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    status, received = c_get(dicom_port(server), identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study))
    assert status.Status == 0xB000, status
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (1, 1)
    assert [ds.SOPInstanceUID for ds in received] == [ct.SOPInstanceUID]


def test_retrieve_without_the_unique_key_of_its_level_is_a900(server):
    """An identifier that lacks the level's unique key (not empty: absent) is refused with
    0xA900 like an empty one; it raised KeyError in the handler (pynetdicom then answered
    0xC413 and logged a traceback)."""
    port = dicom_port(server)
    for query, model in [
        (identifier(QueryRetrieveLevel="STUDY"), StudyRootQueryRetrieveInformationModelGet),
        (identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2.3"), StudyRootQueryRetrieveInformationModelGet),
        (identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.4"),
         StudyRootQueryRetrieveInformationModelGet),
        (identifier(QueryRetrieveLevel="PATIENT"), PatientRootQueryRetrieveInformationModelGet),
    ]:
        status, got = c_get(port, query, model)
        assert status.Status == 0xA900 and status.ErrorComment and got == [], query


def test_find_may_ask_for_attributes_of_ambiguous_vr(server, tmp_path):
    """A C-FIND identifier asking for Pixel Data, LUT Data or Smallest Image Pixel Value
    (whose dictionary VR is "OB or OW", "US or SS"...) is answered; the response failed to
    encode (0xC312)."""
    port = str(dicom_port(server))
    ds = ct_instance(patient_id="DIMSE-AMBIGUOUS")
    path = tmp_path / "ambiguous.dcm"
    path.write_bytes(encode(ds))
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", port, str(path)).returncode == 0
    query = identifier(QueryRetrieveLevel="IMAGE", PatientID="DIMSE-AMBIGUOUS", SOPInstanceUID="")
    query.add_new(0x7FE00010, "OB", b"")
    query.add_new(0x00280106, "US", None)
    query.add_new(0x00283006, "US", None)
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", int(port), ae_title="KUROSHIO")
    assert assoc.is_established
    responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    # pynetdicom's SCU, logging a response it cannot fully decode (it cannot settle the
    # ambiguous VRs either), yields that pending response twice, once without identifier
    assert {status.Status for status, _ in responses[:-1]} == {0xFF00} and responses[-1][0].Status == 0x0000
    assert {i.SOPInstanceUID for _, i in responses[:-1] if i is not None} == {ds.SOPInstanceUID}


def test_get_converts_big_endian_instances_for_peers_taking_little_endian(server, tmp_path):
    """A C-GET by getscu (one context a SOP class, Explicit VR Little Endian accepted) of
    instances stored in Explicit VR Big Endian: each arrives, converted to Explicit VR Little
    Endian (pynetdicom converts between the little endian syntaxes only; the sub-operations
    failed with "no presentation context")."""
    with httpx.Client(base_url=f"{server.base_url}/dicomweb/", timeout=60) as http:
        study, series, stored = big_endian_study(http)
    result = run("getscu", "-v", "-aec", "KUROSHIO", "-S", "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
                 "-k", f"SeriesInstanceUID={series}", "-od", str(tmp_path), "127.0.0.1", str(dicom_port(server)))
    assert result.returncode == 0 and "Failed Suboperations    : 0" in result.stdout + result.stderr, result.stderr
    arrived = {pydicom.dcmread(path).SOPInstanceUID: path.read_bytes() for path in tmp_path.iterdir()}
    assert arrived.keys() == stored.keys()
    for sop, body in arrived.items():
        assert_little_endian_copy(body, stored[sop])



def test_get_inflates_deflated_instances_for_peers_taking_little_endian(server, tmp_path):
    """An instance stored in Deflated Explicit VR Little Endian, which the peer did not
    accept either, arrives inflated, in Explicit VR Little Endian, with the same pixels."""
    ds = pydicom.dcmread(get_testdata_file("image_dfl.dcm"))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    study, series = generate_uid(), generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out)
    body, content_type = multipart_body([out.getvalue()])
    with httpx.Client(base_url=f"{server.base_url}/dicomweb/", timeout=60) as http:
        assert http.post("studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    result = run("getscu", "-v", "-aec", "KUROSHIO", "-S", "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
                 "-k", f"SeriesInstanceUID={series}", "-od", str(tmp_path), "127.0.0.1", str(dicom_port(server)))
    assert result.returncode == 0 and "Failed Suboperations    : 0" in result.stdout + result.stderr, result.stderr
    [path] = list(tmp_path.iterdir())
    arrived = pydicom.dcmread(path)
    assert arrived.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and arrived.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(arrived.pixel_array, pydicom.dcmread(io.BytesIO(out.getvalue())).pixel_array)


def test_find_says_when_matching_keys_were_not_used(server, tmp_path):
    """PS3.4 C.4.1.1.4: a Pending status 0xFF01 says that optional keys of the identifier
    were not supported for matching (here InstitutionName, which the index does not hold, a
    private attribute and a sequence item), so the SCU knows the matches are not filtered by
    them; 0xFF00 says every key was matched. Every response was 0xFF00."""
    port = str(dicom_port(server))
    patient_id = "DIMSE-FF01-" + generate_uid()[-8:]
    ds = ct_instance(patient_id=patient_id)
    ds.InstitutionName = "Kuroshio General"
    path = tmp_path / "ff01.dcm"
    path.write_bytes(encode(ds))
    assert run("storescu", "-aec", "KUROSHIO", "127.0.0.1", port, str(path)).returncode == 0
    code = Dataset()
    code.CodeValue = "X-1"
    private = identifier(QueryRetrieveLevel="STUDY", PatientID=patient_id, StudyInstanceUID="")
    private.add_new(0x00090010, "LO", "KUROSHIO TEST")
    queries = {
        0xFF00: [identifier(QueryRetrieveLevel="STUDY", PatientID=patient_id, StudyInstanceUID="", InstitutionName=""),
                 identifier(QueryRetrieveLevel="IMAGE", PatientID=patient_id, Modality="CT", SOPInstanceUID="")],
        0xFF01: [identifier(QueryRetrieveLevel="STUDY", PatientID=patient_id, StudyInstanceUID="", InstitutionName="Other*"),
                 identifier(QueryRetrieveLevel="STUDY", PatientID=patient_id, StudyInstanceUID="", ProcedureCodeSequence=[code]),
                 private],
    }
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", int(port), ae_title="KUROSHIO")
    assert assoc.is_established
    try:
        for pending, sent in queries.items():
            for query in sent:
                responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
                assert [status.Status for status, _ in responses] == [pending, 0x0000], query
                assert responses[0][1].StudyInstanceUID == ds.StudyInstanceUID
    finally:
        assoc.release()


def test_find_with_an_integer_outside_its_vr_is_a900(server):
    """C-FIND matches through QIDO-RS's code: an InstanceNumber (IS, 32-bit) past its range
    is refused with 0xA900 and an Error Comment, as QIDO-RS answers 400; past 64 bits it
    reached MongoDB, which cannot hold it."""
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", dicom_port(server), ae_title="KUROSHIO")
    assert assoc.is_established
    try:
        for value in ("99999999999", "-2147483649"):
            query = identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.4",
                               SOPInstanceUID="", InstanceNumber=value)
            responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
            status = responses[-1][0]
            assert status.Status == 0xA900 and "InstanceNumber" in status.ErrorComment, (value, status)
    finally:
        assoc.release()


def test_find_with_an_impossible_date_or_a_reversed_range_is_a900(server):
    """A date the calendar does not have, a time past 23:59:60 and a range that starts after
    it ends are refused with 0xA900 and an Error Comment (they were Success, 0 matches)."""
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", dicom_port(server), ae_title="KUROSHIO")
    assert assoc.is_established
    try:
        for keyword, value in (("StudyDate", "20201301"), ("StudyDate", "20240102-20240101"), ("StudyTime", "2401")):
            query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="", **{keyword: value})
            responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
            status = responses[-1][0]
            assert [s.Status for s, _ in responses] == [0xA900] and value in status.ErrorComment, (value, status)
    finally:
        assoc.release()


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """An Explicit VR Little Endian element, written by hand: its length is not checked."""
    if vr in (b"SQ", b"UN", b"OB"):
        return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + b"\0\0" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


def test_identifier_that_cannot_be_decoded_is_a900(server, monkeypatch):
    """An identifier pydicom cannot decode (a US of 3 bytes, an unknown VR, a sequence of
    undefined length without its delimiter) is refused with 0xA900 and an Error Comment by
    C-FIND, C-GET and C-MOVE; the handler raised, pynetdicom answered 0xC311 (0xC413,
    0xC514) and logged a traceback."""
    import pynetdicom.association

    level = _element(0x00080052, b"CS", b"STUDY ") + _element(0x0020000D, b"UI", b"1.2.3.4\0")
    identifiers = {
        "(0028,0010)": level + _element(0x00280010, b"US", b"\1\2\3"),
        "(0010,0010)": level + _element(0x00100010, b"ZZ", b"ab"),
        "cannot be decoded": level + struct.pack("<HH", 0x0008, 0x1032) + b"SQ\0\0" + struct.pack("<L", 0xFFFFFFFF),
    }
    port = dicom_port(server)
    before = server.log_path.stat().st_size
    for expected, raw in identifiers.items():
        # pynetdicom's SCU encodes the identifier it is given: here, the bytes as they are
        monkeypatch.setattr(pynetdicom.association, "encode", lambda *args, raw=raw, **kwargs: raw)
        ae = AE()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", port, ae_title="KUROSHIO")
        assert assoc.is_established
        responses = list(assoc.send_c_find(identifier(QueryRetrieveLevel="STUDY"), StudyRootQueryRetrieveInformationModelFind))
        assoc.release()
        assert [status.Status for status, _ in responses] == [0xA900] and expected in responses[0][0].ErrorComment, expected
        status, got = c_get(port, identifier(QueryRetrieveLevel="STUDY"))
        assert status.Status == 0xA900 and expected in status.ErrorComment and got == [], expected
        # no C-MOVE destination is configured here: pynetdicom answers 0xA801 before the
        # identifier is read, so the C-MOVE handler's reading is checked in-process below
    time.sleep(0.5)
    log = server.log_path.read_bytes()[before:].decode(errors="replace")
    assert "Traceback" not in log and "Exception in handler" not in log


def test_move_identifier_that_cannot_be_decoded_is_a900(mover, monkeypatch):
    """C-MOVE to a configured destination with an identifier pydicom cannot decode: 0xA900
    with an Error Comment (it was 0xC514 and a logged traceback), nothing sent."""
    import pynetdicom.association

    live, _ = mover
    raw = _element(0x00080052, b"CS", b"STUDY ") + _element(0x0020000D, b"UI", b"1.2.3.4\0") + _element(0x00280010, b"US", b"\1")
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *args, **kwargs: raw)
    status = c_move(dicom_port(live), identifier(QueryRetrieveLevel="STUDY"))
    assert status.Status == 0xA900 and "(0028,0010)" in status.ErrorComment, status


def test_error_comment_is_one_value(server):
    """The Error Comment (LO) of a refused multi-valued key is one value: the backslash of
    the quoted value is not sent as such (the SCU saw the comment cut at it)."""
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", dicom_port(server), ae_title="KUROSHIO")
    assert assoc.is_established
    query = identifier(QueryRetrieveLevel="STUDY", StudyDate=["20240102", "2020-01-01"])
    responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    status = responses[-1][0]
    assert status.Status == 0xA900 and isinstance(status.ErrorComment, str), status
    assert status.ErrorComment.startswith("'20240102") and "DICOM date" in status.ErrorComment, status.ErrorComment


def test_a_peer_that_stops_in_the_middle_of_a_pdu_is_disconnected(mongod, tmp_path):
    """A connection that sends part of a PDU (or an unknown PDU type and a few bytes) and
    then nothing is closed after the network timeout (2 s here): pynetdicom's DUL thread
    waited in a blocking read, holding one of the AE's association slots, until the peer
    closed it. The AE runs in this process so that the timeout can be lowered."""
    with entity_in_this_process(mongod, tmp_path) as (entity, port):
        entity.ae.network_timeout = 2  # each association takes it from the AE as it opens
        for sent in (b"\x01\x00\x00\x00\x01\x00" + b"\0" * 10,  # an A-ASSOCIATE-RQ of 256 bytes, 10 sent
                     b"\x09\x00\x00\x00\x00\x04ab"):  # an unknown PDU type, then part of the next header
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.settimeout(20)
                connection.sendall(sent)
                start = time.monotonic()
                while connection.recv(4096):  # an A-ABORT may come first; then the close
                    pass
                assert time.monotonic() - start < 10, sent
