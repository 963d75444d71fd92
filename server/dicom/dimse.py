"""The DIMSE Application Entity (PS3.7, PS3.8): C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET.

pynetdicom runs the AE: each association in its own thread, our handlers bound to its
events. A handler identifies the calling AE, asks `authorization.decide`, calls the same
services as DICOMweb (the archive's ingest path, `qido` matching, the blob store) on the
server's event loop, answers with PS3.4 status codes, and records the outcome with
`audit.record`. TCP_NODELAY is set on every association socket, incoming and outgoing:
without it each C-STORE waits on delayed ACKs (about 50 ms).

Supported: Verification; every Storage SOP Class pydicom knows, in every transfer syntax
pydicom knows (with SCU/SCP role selection, for C-GET); Patient Root and Study Root
Query/Retrieve FIND, MOVE and GET at every level of each model. C-MOVE sends to the AEs
configured in KUROSHIO_DICOM_REMOTE_AES only, over as many successive associations as the
presentation contexts of its instances need (`SubAssociations`); C-GET sends over the
requester's association, in the contexts it proposed.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import IO, Any, TypeVar

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from server.dicom import qido, wado
from server.dicom.archive import Archive, Outcome
from server.security import audit
from server.security.authorization import Access, Forbidden, Principal, decide

log = logging.getLogger("kuroshio.dimse")
T = TypeVar("T")

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_KEYS_NOT_SUPPORTED = 0xFF01  # C-FIND: optional keys not supported for matching (PS3.4 C.4.1.1.4)
CANCEL = 0xFE00
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700  # C-FIND: "Refused: Out of Resources" (PS3.4 C.4.1.1.4)
UNABLE_TO_PROCESS = 0xC001  # C-FIND / C-MOVE / C-GET: "unable to process" (PS3.4 C.4)
IDENTIFIER_DOES_NOT_MATCH = 0xA900
MOVE_DESTINATION_UNKNOWN = 0xA801

# A received data set goes to a temporary PS3.10 file as its PDUs arrive, not to memory: a
# whole slide image level can be gigabytes (pynetdicom's documented switch for this).
_config.STORE_RECV_CHUNKED_DATASET = True


def _received_data_set_file(**options: Any) -> IO[bytes]:
    """The file pynetdicom writes a received C-STORE data set into (its NamedTemporaryFile).

    For our AE it is in the blob store's staging directory, not in /tmp: staging it is
    then a hard link, where a /tmp on another file system (a RAM-backed tmpfs, Debian's
    default) meant a copy of every instance and a slide held in memory while it arrived;
    and one that a crash leaves behind is swept with the other staging files. pynetdicom
    decodes PDUs in the association's DUL thread, which knows its association and AE.
    Other AEs of this process (a test's SCU) keep pynetdicom's default.
    """
    ae = getattr(getattr(threading.current_thread(), "assoc", None), "ae", None)
    directory = ae.received_dir if isinstance(ae, _AE) else None
    return NamedTemporaryFile(dir=directory, prefix="dimse-", **options)


dimse_messages.NamedTemporaryFile = _received_data_set_file  # type: ignore[attr-defined]


def _discard_unserved(event: Event) -> None:
    """Delete the data set files of C-STOREs the association will never serve: the one
    being received when its connection closed and any still queued. pynetdicom deletes a
    file only after its C-STORE is handled, so an aborted transfer (a slide cut off half
    way) would otherwise stay on disk. Runs in the DUL thread, the only writer of the
    message being received; a queued message is taken from the queue, so the association
    thread either serves it (and pynetdicom deletes its file) or never sees it."""
    dimse = event.assoc.dimse
    files = []
    if dimse.message is not None and dimse.message._data_set_file is not None:
        files.append(dimse.message._data_set_file)
        dimse.message._data_set_file = None
    while True:
        try:
            _, primitive = dimse.msg_queue.get_nowait()
        except queue.Empty:
            break
        if getattr(primitive, "_dataset_file", None) is not None:
            files.append(primitive._dataset_file)
    for file in files:
        file.close()
        Path(file.name).unlink(missing_ok=True)


# pynetdicom logs every DIMSE message at INFO and dumps C-FIND/MOVE/GET identifiers with
# it: patient names and IDs in a plain log file, a line per instance of a transfer. The
# audit trail records each operation; the log keeps associations and problems.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
logging.getLogger("pynetdicom._handlers").setLevel(logging.WARNING)


def _no_timeout_traceback(record: logging.LogRecord) -> bool:
    """Drop the traceback pynetdicom's DUL logs (LOGGER.exception) when a peer left a PDU
    unfinished for `network_timeout` seconds (`_on_connection_open`): the line before it,
    "Connection closed before the entire PDU was received", says what happened."""
    return not (record.exc_info and isinstance(record.exc_info[1], TimeoutError))


logging.getLogger("pynetdicom.dul").addFilter(_no_timeout_traceback)
MAXIMUM_PDU_SIZE = 4 * 1024 * 1024

STORAGE_SOP_CLASSES = sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts})
# Presentation contexts an association may have: their IDs are the odd numbers 1-255 (PS3.8 9.3.2.2).
MAX_CONTEXTS = 128
# Explicit VR Little Endian first: pynetdicom accepts the first of ours that the peer
# proposes, and a sender then transfers files in that syntax without converting them.
TRANSFER_SYNTAXES = sorted(ALL_TRANSFER_SYNTAXES, key=lambda uid: uid != "1.2.840.10008.1.2.1")
UNCOMPRESSED = (wado.EXPLICIT_LE, wado.IMPLICIT_LE)  # what every Storage SCP accepts (PS3.5 10.1)
QUERY_RETRIEVE = {
    "find": (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind),
    "move": (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove),
    "get": (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet),
}
STUDY_ROOT = {str(root) for _, root in QUERY_RETRIEVE.values()}
LEVELS = {"PATIENT": "patient", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
# The unique key of each level (PS3.4 C.6.1.1, C.6.2.1), from the top of the hierarchy down.
UNIQUE_KEYS = {
    "patient": "PatientID", "study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID",
}


@dataclass(frozen=True, slots=True)
class RemoteAE:
    title: str
    host: str
    port: int


def parse_remote_aes(text: str) -> dict[str, RemoteAE]:
    """`AET@host:port,AET@host:port` -> {AET: RemoteAE} (ValueError if malformed)."""
    remotes: dict[str, RemoteAE] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        title, at, address = item.partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and title and host and port.isdigit() and 0 < int(port) < 65536 and len(title) <= 16):
            raise ValueError(f"{item!r} is not AET@host:port")
        remotes[title] = RemoteAE(title, host.strip("[]"), int(port))
    return remotes


def _on_connection_open(event: Event) -> None:
    """TCP_NODELAY (see the module docstring) and the association's network timeout on
    every association socket, incoming and outgoing.

    pynetdicom leaves both kinds blocking without a timeout (an accepted socket does not
    inherit the listening socket's; a requested one has its timeout cleared once it is
    connected), and its DUL thread reads a PDU whole with blocking `recv` calls. A peer
    that sent part of a PDU and then nothing (or an unknown PDU type followed by a few
    bytes) held the thread and one of the `maximum_associations` slots until it closed
    the connection: the ARTIM and network timers are checked between reads, never during
    one. With the timeout the read fails after `network_timeout` seconds and pynetdicom
    closes the connection (Evt17).
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(event.assoc.network_timeout)


class ApplicationEntity:
    """Our SCP: started and stopped by the app's lifespan."""

    def __init__(self, archive: Archive, ae_title: str, remotes: dict[str, RemoteAE], loop: asyncio.AbstractEventLoop) -> None:
        self.archive = archive
        self.remotes = remotes
        self.loop = loop
        self.ae = _AE(ae_title=ae_title)
        self.ae.received_dir = archive.blobs.incoming
        # Large PDUs (fewer, from the sender), but bounded: a PDU is held in memory whole,
        # and a slide sent as one unlimited PDU would be gigabytes.
        self.ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        self.ae.network_timeout = 60
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 60
        self.ae.maximum_associations = 32
        self.ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for models in QUERY_RETRIEVE.values():
            for model in models:
                self.ae.add_supported_context(model)
        self.server: ThreadedAssociationServer | None = None

    def start(self, host: str, port: int) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, _on_connection_open),
            (evt.EVT_CONN_CLOSE, _discard_unserved),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_C_MOVE, self.on_move),
        ]
        self.server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # --- helpers ------------------------------------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a service coroutine on the server's event loop from this handler thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    @staticmethod
    def principal(event: Event) -> Principal:
        requestor = event.assoc.requestor
        return Principal(subject=requestor.ae_title.strip(), kind="ae", address=str(requestor.address))

    def admitted(self, event: Event, interaction: str) -> tuple[Principal, Access] | None:
        principal = self.principal(event)
        access = Access("dimse", interaction)
        try:
            decide(principal, access)
        except Forbidden:
            audit.record(principal, access, NOT_AUTHORIZED, "refused by policy")
            return None
        return principal, access

    # --- C-ECHO / C-STORE ---------------------------------------------------------------

    def on_echo(self, event: Event) -> int:
        admitted = self.admitted(event, "C-ECHO")
        if admitted is None:
            return NOT_AUTHORIZED
        audit.record(*admitted, SUCCESS, "C-ECHO")
        return SUCCESS

    def on_store(self, event: Event) -> int | Dataset:
        admitted = self.admitted(event, "C-STORE")
        if admitted is None:
            return NOT_AUTHORIZED
        received = event.dataset_path  # the PS3.10 file pynetdicom wrote as PDUs came
        try:
            staged = self.archive.blobs.stage_file(received)
        finally:  # the staged link (or copy) holds the bytes now: one name fewer to leave behind
            received.unlink(missing_ok=True)
        prepared = self.archive.prepare(staged)
        outcome: Outcome = self.run(self.archive.commit([prepared]))[0]
        audit.record(*admitted, outcome.status, f"C-STORE {outcome.sop or ''} {outcome.message}".strip())
        if outcome.ok:
            return SUCCESS
        return failure(outcome.status, outcome.message)

    # --- C-FIND -------------------------------------------------------------------------

    def on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        admitted = self.admitted(event, "C-FIND")
        if admitted is None:
            yield NOT_AUTHORIZED, None
            return
        try:
            level, query, requested = self.query(decoded_identifier(event), str(event.request.AffectedSOPClassUID))
            results, complete = self.run(self.find(level, query))
        except (qido.QueryError, ValueError) as exc:
            audit.record(*admitted, IDENTIFIER_DOES_NOT_MATCH, f"C-FIND {exc}")
            yield failure(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
            return
        audit.record(*admitted, SUCCESS if complete else OUT_OF_RESOURCES,
                     f"C-FIND {level} {len(results)} matches{'' if complete else ' (more not sent)'}")
        # a key with a value that was not matched (not a key of the level or its parents
        # here, a private attribute, a sequence): the matches are not filtered by it
        pending = PENDING_KEYS_NOT_SUPPORTED if query.unsupported else PENDING
        for result in results:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield pending, response_identifier(result, requested, level, self.ae.ae_title)
        if not complete:
            # Success would say every match was sent (PS3.4 C.4.1.3.1); a final Failure
            # ends the pending responses and says they are not all
            yield failure(OUT_OF_RESOURCES, f"More than {qido.MAX_LIMIT} matches: narrow the query"), None

    def query(self, identifier: Dataset, model: str) -> tuple[str, qido.QidoQuery, list[str]]:
        """The query level, the QidoQuery (whose `unsupported` names the keys with a value
        it does not match on), and the requested tags of a C-FIND/MOVE/GET identifier of
        information `model` (a SOP Class UID: Study Root has no PATIENT level, PS3.4 C.6.2)."""
        raw_level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        allowed = [name for name in LEVELS if name != "PATIENT" or model not in STUDY_ROOT]
        if raw_level not in allowed:
            raise qido.QueryError(f"QueryRetrieveLevel {raw_level!r} is not {', '.join(allowed)}")
        level = LEVELS[raw_level]
        params: list[tuple[str, str]] = []
        requested: list[str] = []
        sequences: list[str] = []  # sequence matching (PS3.4 C.2.2.2.6) is not supported
        for element in identifier_elements(identifier):
            if element.tag in (0x00080052, 0x00080005) or element.tag.group == 0x0002:
                continue
            requested.append(f"{element.tag:08X}")
            if element.VR == "SQ":
                if any(_has_value(item) for item in element.value or []):
                    sequences.append(element.keyword or f"{element.tag:08X}")
                continue
            if element.value in (None, "", b""):
                continue
            params.append((element.keyword or f"{element.tag:08X}", _match_text(element)))
        query_level = "study" if level == "patient" else level
        query = qido.parse(query_level, params, {})
        query.unsupported.extend(sequences)
        return level, query, requested

    async def find(self, level: str, query: qido.QidoQuery) -> tuple[list[qido.Json], bool]:
        """The matches (of at most qido.MAX_LIMIT studies, series or instances) and whether
        they are all there are."""
        results, more = await qido.search(self.archive.index, query, "")
        if level != "patient":
            return results, not more
        patients: dict[tuple[str, str], qido.Json] = {}
        for study in results:
            key = tuple(_first(study.get(qido.TAGS[k])) for k in ("PatientID", "IssuerOfPatientID"))
            patient = patients.setdefault(key, {t: v for t, v in study.items() if t in PATIENT_TAGS})  # type: ignore[arg-type]
            # Number of Patient Related Studies / Series / Instances, summed over the studies
            for patient_tag, study_count in PATIENT_COUNTS.items():
                added = 1 if study_count is None else _first(study.get(study_count)) or 0
                patient[patient_tag] = {"vr": "IS", "Value": [(_first(patient.get(patient_tag)) or 0) + added]}
        return list(patients.values()), not more

    # --- C-GET / C-MOVE -----------------------------------------------------------------

    def matching_instances(self, identifier: Dataset, model: str) -> list[wado.Stored]:
        """Every instance under the entities the identifier's unique keys name (any level)."""
        level, query, _ = self.query(identifier, model)
        check_unique_keys(identifier, level, model in STUDY_ROOT)
        instance_query = qido.QidoQuery("instance", filters=query.filters)

        async def find() -> list[wado.Stored]:
            return await wado.instances_where(self.archive, await qido.resolve(self.archive.index, instance_query))

        return self.run(find())

    def datasets(
        self, event: Event, stored: list[wado.Stored], accepted: Callable[[wado.Stored], list[PresentationContext]]
    ) -> Iterator[tuple[int, Dataset | None]]:
        """The C-STORE sub-operations' datasets, read one at a time as pynetdicom asks.

        An instance goes as stored where the peer `accepted` (the presentation contexts of
        the association that carries its sub-operation) its transfer syntax, or where
        pynetdicom converts it (the little endian uncompressed syntaxes); otherwise, up to
        wado.TRANSCODE_MAX_BYTES, decoded (or, from Big Endian, converted) to Explicit VR
        Little Endian by WADO's transcoder, so that a peer taking those only still gets it.

        Memory is bounded by the largest instance, not the study: about three times its
        size while it is sent (the decoded dataset plus pynetdicom's encoded copies).
        pynetdicom's `send_c_store` can stream from a file path in chunks
        (`STORE_SEND_CHUNKED_DATASET`), but its C-GET and C-MOVE service classes (3.0)
        accept only a decoded `Dataset` from this generator, so that path is not open here.
        """
        for item in stored:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, self.dataset(item, accepted(item))

    def dataset(self, item: wado.Stored, accepted: list[PresentationContext]) -> Dataset:
        """One instance as the peer takes it (see `datasets`); as stored when no association
        carries it (its sub-operation fails)."""
        path = self.archive.blobs.path(item.blob)
        if accepted and _needs_decoding(item, accepted) and item.size <= wado.TRANSCODE_MAX_BYTES:
            try:
                return wado.transcoded(str(path), wado.EXPLICIT_LE)
            except Exception as exc:  # pydicom's decoders raise many kinds of errors
                log.warning("cannot decode %s for a C-STORE sub-operation: %s", item.sop, exc)
        return pydicom.dcmread(path)  # a sub-operation that fails if the peer does not take it

    def to_retrieve(self, event: Event, admitted: tuple[Principal, Access]) -> list[wado.Stored] | Dataset:
        """The instances a C-GET/C-MOVE identifier selects, or (audited) the failure status
        answering a malformed identifier."""
        try:
            return self.matching_instances(decoded_identifier(event), str(event.request.AffectedSOPClassUID))
        except (qido.QueryError, ValueError) as exc:
            audit.record(*admitted, IDENTIFIER_DOES_NOT_MATCH, f"{admitted[1].interaction} {exc}")
            return failure(IDENTIFIER_DOES_NOT_MATCH, str(exc))

    def on_get(self, event: Event) -> Iterator[Any]:
        admitted = self.admitted(event, "C-GET")
        if admitted is None:
            yield NOT_AUTHORIZED, None
            return
        stored = self.to_retrieve(event, admitted)
        if isinstance(stored, Dataset):
            yield from _refuse_retrieve(stored)
            return
        audit.record(*admitted, SUCCESS, f"C-GET {len(stored)} instances")
        yield len(stored)
        # The requester proposed the contexts (at most 128, SCP role by role selection): an
        # instance of a SOP class without one fails as a sub-operation.
        yield from self.datasets(event, stored, lambda item: event.assoc.accepted_contexts)

    def on_move(self, event: Event) -> Iterator[Any]:
        admitted = self.admitted(event, "C-MOVE")
        if admitted is None:
            yield None, None
            return
        destination = self.remotes.get(event.move_destination.decode("ascii", "replace").strip()
                                       if isinstance(event.move_destination, bytes) else str(event.move_destination).strip())
        if destination is None:
            audit.record(*admitted, MOVE_DESTINATION_UNKNOWN, f"C-MOVE to unknown {event.move_destination!r}")
            yield None, None
            return
        stored = self.to_retrieve(event, admitted)
        if isinstance(stored, Dataset):
            # pynetdicom associates with the destination before it sends any status, a failure
            # too: no sub-associations stand in for that association, so the refusal does not
            # depend on the destination being reachable (it was 0xA801 when it was not)
            yield destination.host, destination.port, {"sub_associations": SubAssociations([])}
            yield from _refuse_retrieve(stored)
            return
        sub_associations = SubAssociations(_context_batches(stored))
        stored = sorted(stored, key=sub_associations.order)  # each association's instances in a row
        handlers = [(evt.EVT_CONN_OPEN, _on_connection_open)]
        yield destination.host, destination.port, {"sub_associations": sub_associations, "evt_handlers": handlers}
        audit.record(*admitted, SUCCESS, f"C-MOVE {len(stored)} instances to {destination.title}")
        yield len(stored)
        yield from self.datasets(event, stored, lambda item: sub_associations.accepted(item.sop_class))


class _Acceptor(ThreadedAssociationServer):
    """pynetdicom's threaded server, with supported contexts that are quick to copy
    (`_SupportedContexts`) and without its housekeeping: every 60 polls of its accept
    loop (30 s) that runs a full `gc.collect()`, to reclaim finished associations'
    threads. A full collection holds the GIL throughout, so it stopped every thread of the
    server process for as long as it took: the HTTP event loop answered nothing for about
    170 ms twice a minute (measured with reads every 5 ms). Python's own generational
    collector reclaims those reference cycles as it does any other."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = _SupportedContexts(self.contexts)

    def service_actions(self) -> None:
        return None


class _SupportedContexts(list[PresentationContext]):
    """The acceptor's supported presentation contexts, which pynetdicom deep-copies for each
    association (so that changing one association's contexts changes no other). A deep
    copy of ours (170 SOP classes x 45 transfer syntaxes, each UID a pydicom `UID` object)
    took about 60 ms with the GIL held: every association waited that long for its
    A-ASSOCIATE-AC, and the server process's other threads (the HTTP event loop among
    them) stood still meanwhile. UIDs are immutable strings, so this copy shares them and
    copies each context and its lists, which keeps the isolation at about 1 ms."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            for name, value in vars(context).items():
                if isinstance(value, list):
                    vars(duplicate)[name] = list(value)
            copies.append(duplicate)
        return copies


class _AE(AE):
    """pynetdicom's AE, whose `associate` gives a C-MOVE handler's `SubAssociations` (passed
    in the keyword arguments the handler yields for it) in place of one association, whose
    `start_server` runs our `_Acceptor`, and whose received data sets are written in
    `received_dir` (`_received_data_set_file`)."""

    received_dir: Path | None = None

    def make_server(self, address: Any, *args: Any, server_class: Any = None, **kwargs: Any) -> Any:
        if server_class is ThreadedAssociationServer:  # start_server(block=False)
            server_class = _Acceptor
        return AE.make_server(self, address, *args, server_class=server_class, **kwargs)

    def associate(self, addr: str, port: int, *args: Any, sub_associations: SubAssociations | None = None,
                  **kwargs: Any) -> Any:
        if sub_associations is None:
            return AE.associate(self, addr, port, *args, **kwargs)
        sub_associations.start(lambda contexts: AE.associate(self, addr, port, *args, contexts=contexts, **kwargs))
        return sub_associations


class SubAssociations:
    """The associations with a C-MOVE destination that carry the C-STORE sub-operations, one
    after the other, each proposing the presentation contexts of a batch of SOP classes
    (`_context_batches`: at most 128 contexts, every context of a SOP class in one batch).

    pynetdicom's C-MOVE SCP opens one association with the destination and sends each data
    set the handler yields over it, counting the sub-operations from the answers. This
    object stands in for that association (what pynetdicom uses of one: `is_established`,
    `send_c_store`, `release`, `dul`), so its counting and its responses stay as they are:
    the first association is opened at once (pynetdicom answers 0xA801 if it fails), each
    next one when the handler asks for the contexts of an instance of its batch, after the
    previous one is released. A batch whose association fails fails its sub-operations.
    With no batches (a refused C-MOVE) it opens nothing and stands in for an established
    association, so that pynetdicom sends the failure without contacting the destination.
    """

    def __init__(self, batches: list[list[PresentationContext]]) -> None:
        self.batches = batches
        self.batch_of = {str(cx.abstract_syntax): index for index, batch in enumerate(batches) for cx in batch}
        self.index = 0
        self.current: Association | None = None
        self.associate: Callable[[list[PresentationContext]], Association] | None = None

    def order(self, item: wado.Stored) -> int:
        return self.batch_of[item.sop_class]

    def start(self, associate: Callable[[list[PresentationContext]], Association]) -> None:
        self.associate = associate
        if self.batches:
            self.current = associate(self.batches[0])

    def accepted(self, sop_class: str) -> list[PresentationContext]:
        """The accepted contexts of the association that carries `sop_class` (opened now if
        it is not the current one); none if it failed."""
        index = self.batch_of[sop_class]
        if index != self.index:
            assert self.associate is not None
            self.release()
            self.index = index
            self.current = self.associate(self.batches[index])
        return self.current.accepted_contexts if self.is_established else []  # type: ignore[union-attr]

    @property
    def is_established(self) -> bool:
        if not self.batches:
            return True
        return self.current is not None and self.current.is_established

    @property
    def dul(self) -> Any:
        return self.current.dul  # type: ignore[union-attr]

    def send_c_store(self, dataset: Dataset, **kwargs: Any) -> Dataset:
        return self.current.send_c_store(dataset, **kwargs)  # type: ignore[union-attr]

    def release(self) -> None:
        if self.current is not None and self.current.is_established:
            self.current.release()


def decoded_identifier(event: Event) -> Dataset:
    """The identifier of a C-FIND/C-MOVE/C-GET request with every element decoded, or
    QueryError (answered 0xA900, the reason in the Error Comment) if pydicom cannot.

    pynetdicom decodes the identifier when the handler first asks for it, and pydicom
    converts an element's bytes when it is first read: a sequence or UN element of
    undefined length without its delimiter, an element whose length does not fit its VR
    (a US of 3 bytes) or with a VR pydicom does not know each raised there (OSError,
    BytesLengthException, NotImplementedError...), and pynetdicom answered 0xC311 (C-GET
    0xC413, C-MOVE 0xC514) and logged a traceback. Elements of ambiguous VR are left to
    `identifier_elements`.
    """
    try:
        identifier = event.identifier
    except Exception:  # pydicom raises many kinds of errors on malformed input
        raise qido.QueryError("The identifier cannot be decoded") from None

    def decode(dataset: Dataset) -> None:
        for tag in list(dataset.keys()):
            try:
                element = dataset[tag]
            except AttributeError:  # an ambiguous VR (identifier_elements)
                continue
            except Exception:  # pydicom raises many kinds of errors on malformed input
                raise qido.QueryError(f"Element {tag} cannot be decoded") from None
            if element.VR == "SQ":
                for item in element.value or []:
                    decode(item)

    decode(identifier)
    return identifier


def identifier_elements(identifier: Dataset) -> Iterator[pydicom.DataElement]:
    """The elements of a C-FIND/C-MOVE/C-GET identifier, one of ambiguous VR that the
    identifier cannot settle given as UN with its bytes.

    pydicom resolves "US or SS", "OB or OW" and the like from other attributes (Pixel
    Representation, Bits Allocated) when an element is read, and raises AttributeError when
    they are absent, as they are in an identifier that asks for Smallest Image Pixel Value
    or Pixel Data: the handler failed (0xC311) and pynetdicom logged a traceback.
    """
    for tag in list(identifier.keys()):
        try:
            yield identifier[tag]
        except AttributeError:
            raw = identifier.get_item(tag)
            yield pydicom.DataElement(tag, "UN", raw.value if raw is not None else b"")


def check_unique_keys(identifier: Dataset, level: str, study_root: bool) -> None:
    """Refuse (QueryError) a C-MOVE/C-GET identifier that is not the unique keys of its level
    and of the levels above (PS3.4 C.4.2.2.1, C.4.3.2.1): without this an empty or wildcard
    key, or a key such as PatientName, would retrieve whatever it matches, up to the whole
    archive. The level's key may be a list of UIDs at the STUDY level and below; a
    PATIENT-level retrieve names one patient, and each key above the level one value
    (a list of PatientIDs matched nothing, with success). Keys above the level may be
    absent (they only narrow the match); other keys only empty."""
    levels = list(UNIQUE_KEYS)[1 if study_root else 0:]
    keys = [UNIQUE_KEYS[name] for name in levels[:levels.index(level) + 1]]
    for element in identifier_elements(identifier):
        if element.tag in (0x00080052, 0x00080005) or element.tag.group == 0x0002 or element.keyword in keys:
            continue
        if element.value not in (None, "", b""):
            raise qido.QueryError(f"{element.keyword or element.tag} is not a unique key of this level or above")
    for keyword in keys:
        # an absent key is treated as an empty one: data_element raises KeyError for it,
        # which pynetdicom answered with 0xC413 and a logged traceback
        element = identifier.data_element(keyword) if keyword in identifier else None
        given = element is not None and element.value not in (None, "")
        values = _match_text(element).split("\\") if given else []
        if keyword == keys[-1] and not values:
            raise qido.QueryError(f"{keyword} must be given")
        if len(values) > 1 and (keyword != keys[-1] or level == "patient"):
            raise qido.QueryError(f"{keyword} must be a single value")
        if any(not v.strip() or "*" in v or "?" in v for v in values):
            raise qido.QueryError(f"{keyword} must be a value without wildcards")


def failure(status: int, comment: str) -> Dataset:
    """A failure status with its Error Comment: VR LO, at most 64 characters of the default
    repertoire without backslashes (PS3.5 6.2). A comment quoting a multi-valued key
    ("'20240102\\20200101' is not a DICOM date") was split at its first backslash and the
    SCU saw "'20240102" only; one quoting undecodable bytes sent them as they were."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = "".join(
        "/" if char == "\\" else char if " " <= char <= "~" else "?" for char in comment[:64]
    )
    return ds


def _refuse_retrieve(status: Dataset) -> Iterator[Any]:
    """The yields that make pynetdicom answer a C-GET/C-MOVE with a failure and send nothing:
    it takes a final status only after a positive number of sub-operations."""
    yield 1
    yield status, None


# patient-level count -> the study-level count it sums (None: the studies themselves)
PATIENT_COUNTS = {"00201200": None, "00201202": "00201206", "00201204": "00201208"}
PATIENT_TAGS = {qido.TAGS[k] for k in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "SpecificCharacterSet")}


def _context_batches(stored: list[wado.Stored]) -> list[list[PresentationContext]]:
    """Presentation contexts for the C-MOVE sub-associations, in batches of at most 128
    (PS3.8), one association each: each SOP class with the uncompressed syntaxes and, in a
    context of its own, the other syntaxes its instances are stored in, so that a peer can
    take either (one context with all of them would let it accept only one). A SOP class's
    contexts are never split between batches; the classes are in UID order, so the batches
    of the same instances are always the same."""
    stored_syntaxes: dict[str, set[str]] = {}
    for item in stored:
        stored_syntaxes.setdefault(item.sop_class, set()).add(item.transfer_syntax)
    batches: list[list[PresentationContext]] = [[]]
    for sop_class, syntaxes in sorted(stored_syntaxes.items()):
        contexts = [build_context(sop_class, list(UNCOMPRESSED))]
        if syntaxes - set(UNCOMPRESSED):
            contexts.append(build_context(sop_class, sorted(syntaxes - set(UNCOMPRESSED))))
        if len(batches[-1]) + len(contexts) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend(contexts)
    return batches


def _needs_decoding(item: wado.Stored, accepted: list[PresentationContext]) -> bool:
    """Whether no accepted context takes the instance as stored or by pynetdicom's own
    conversion, which joins the little endian uncompressed syntaxes only: an instance
    stored in Explicit VR Big Endian is converted by WADO's transcoder like a compressed
    one (a peer that accepted Explicit VR Little Endian for its SOP class failed it)."""
    if item.transfer_syntax in UNCOMPRESSED:
        return False
    return not any(
        cx.abstract_syntax == item.sop_class and item.transfer_syntax in cx.transfer_syntax for cx in accepted
    )


def _vr(tag: str) -> str:
    """The VR of an attribute answered without a value in a C-FIND response.

    Where the dictionary gives a choice ("OB or OW" for Pixel Data, "US or SS"), the first
    is taken: pydicom cannot encode an ambiguous VR without the attributes that settle it,
    so asking for such an attribute made the whole response fail to encode.
    """
    try:
        return pydicom.datadict.dictionary_VR(int(tag, 16)).split(" or ")[0]
    except KeyError:
        return "UN"


def _first(element: qido.Json | None) -> Any:
    values = (element or {}).get("Value")
    return values[0] if values else None


def _has_value(item: Dataset) -> bool:
    """Whether a sequence item of an identifier holds a matching value (at any depth)."""
    return any(
        any(_has_value(nested) for nested in element.value or []) if element.VR == "SQ"
        else element.value not in (None, "", b"")
        for element in identifier_elements(item)
    )


def _match_text(element: pydicom.DataElement) -> str:
    value = element.value
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def response_identifier(result: qido.Json, requested: list[str], level: str, ae_title: str) -> Dataset:
    """A C-FIND response: the requested attributes, filled where the result has them."""
    chosen: qido.Json = {}
    for tag in requested:
        chosen[tag] = result.get(tag) or {"vr": _vr(tag)}
    for keyword in {"study": ("StudyInstanceUID",), "series": ("StudyInstanceUID", "SeriesInstanceUID"),
                    "instance": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), "patient": ("PatientID",)}[level]:
        tag = qido.TAGS[keyword]
        if tag in result:
            chosen[tag] = result[tag]
    for tag, element in list(chosen.items()):
        if "BulkDataURI" in element:
            chosen[tag] = {"vr": element["vr"]}
    ds = Dataset.from_json(chosen)
    # The values are Unicode (DICOM JSON), whatever the instances' character sets were:
    # declared as UTF-8 in every response (PS3.4 C.4.1.1.3.2), and encoded so by pydicom.
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = {v: k for k, v in LEVELS.items()}[level]
    ds.RetrieveAETitle = ae_title
    return ds
