"""DICOMweb routes under /dicomweb (PS3.18): STOW-RS, QIDO-RS, WADO-RS, and delete.

Each route parses the request, calls one service (archive, qido, wado) and encodes the
answer. Every route is declared with `@dicomweb(...)`, which adds the authorization
dependency and records it in `RESOURCES`, the list the conformance statement is built
from. Errors are rendered by `error_response` (registered for "/dicomweb" in
server/app.py): the status code, a `Warning: 299` header and a text body, as PS3.18 8.6.3
describes; STOW-RS failures per instance are in the response's FailedSOPSequence.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from python_multipart.exceptions import MultipartParseError
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from server.dicom import multipart, qido, wado, wsi_rendered
from server.dicom.archive import Archive, Outcome, Prepared
from server.dicom.frames import FrameTable
from server.dicom.instance import CANNOT_UNDERSTAND, Refused
from server.security.authorization import authorize
from server.store.blobs import StagedFile

DICOM_JSON = "application/dicom+json"
router = APIRouter(prefix="/dicomweb")
# (interaction, method, path) of every route, for the conformance statement.
RESOURCES: list[tuple[str, str, str]] = []
FIRST_ROUTES: list[Route] = []  # matched before every other route of the app (see `dicomweb`)
IN_LOOP_READ = 8 * 1024 * 1024  # blobs up to this size are read without a thread hop
STOW_BATCH = 50


class DicomWebError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def warning(message: str) -> str:
    """`message` as a `Warning: 299` header value, its quoted text printable ASCII only.

    Messages quote the client's input (a UID, a query key), and a header value must be
    latin-1 without control characters: a NUL (`/studies/%00`) made the server drop the
    connection without an answer, a non-latin-1 character (`/studies/%ED%A0%80`) gave a
    500. Anything else is written as a Python escape (`\\x00`, `\\ufffd`); the body keeps
    the message as it is, in UTF-8.
    """
    quoted = message.replace('"', "'").replace("\r", " ").replace("\n", " ")
    text = "".join(c if " " <= c <= "~" else ascii(c)[1:-1] for c in quoted)
    return f'299 kuroshio "{text[:900]}"'


def error_response(request: Request, status: int, message: str) -> Response:
    return Response(
        message.encode("utf-8", "backslashreplace"),
        status,
        media_type="text/plain; charset=utf-8",
        headers={"Warning": warning(message)},
    )


def dicomweb(
    interaction: str, method: str, *paths: str, first: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler for `paths` under /dicomweb, behind the authorization dependency.

    `first` routes (slide tiles, asked for hundreds of times a second) are plain Starlette
    routes that the app tries before all others: FastAPI's matching against every route and
    its dependency solving cost more than serving a tile. They run the same authorization."""

    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        admit = authorize("dicomweb", interaction)
        for path in paths:
            RESOURCES.append((interaction, method, "/dicomweb" + path))
            if first:
                async def endpoint(request: Request) -> Response:
                    await admit(request)
                    return await handler(request, **request.path_params)

                FIRST_ROUTES.append(Route("/dicomweb" + path, endpoint, methods=[method]))
            else:
                router.add_api_route(
                    path, handler, methods=[method], response_class=Response, dependencies=[Depends(admit)]
                )
        return handler

    return register


def archive_of(request: Request) -> Archive:
    return request.app.state.dicom


def base(request: Request) -> str:
    return request.app.state.settings.base_url + "/dicomweb"


async def guarded(call: Any) -> Any:
    """Map service exceptions to DICOMweb errors."""
    try:
        return await call
    except (wado.BadRequest, qido.QueryError) as exc:
        raise DicomWebError(400, str(exc)) from None
    except wado.NotFound as exc:
        raise DicomWebError(404, str(exc)) from None
    except wado.NotAcceptable as exc:
        raise DicomWebError(406, str(exc)) from None


# --- STOW-RS ------------------------------------------------------------------------------


@dicomweb("store", "POST", "/studies", "/studies/{study}")
async def store_instances(request: Request, study: str | None = None) -> Response:
    media, params = multipart.parse_header_params(request.headers.get("content-type", ""))
    if media != "multipart/related":
        raise DicomWebError(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    if params.get("type", "application/dicom").lower() != "application/dicom":
        raise DicomWebError(
            415, f"Parts of type {params['type']} are not accepted; send application/dicom (PS3.10 files)"
        )
    if not params.get("boundary"):
        raise DicomWebError(400, "The multipart/related Content-Type has no boundary")
    if len(params["boundary"]) > multipart.MAX_BOUNDARY:
        raise DicomWebError(400, f"The multipart boundary has {len(params['boundary'])} characters; "
                                 f"RFC 2046 allows at most {multipart.MAX_BOUNDARY}")
    if study is not None:
        try:
            wado.check_uids(study)
        except wado.BadRequest as exc:
            raise DicomWebError(400, str(exc)) from None
    outcomes = await receive(request, archive_of(request), params["boundary"], study)
    if not outcomes:
        raise DicomWebError(400, "The request contained no instances")
    stored = sum(1 for o in outcomes if o.ok)
    status = 200 if stored == len(outcomes) else 202 if stored else 409
    return Response(qido.encode_one(stow_response(outcomes, base(request))), status, media_type=DICOM_JSON)


async def receive(request: Request, archive: Archive, boundary: str, study: str | None) -> list[Outcome]:
    """Stream parts into staging files; prepare them in threads as each completes, and
    index them in batches, so memory holds a chunk, never an instance. A part whose
    Content-Type is not application/dicom (PS3.18 10.5.1; none means the request's type)
    is not read: it is refused as one that cannot be understood."""
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[Prepared]] = []
    outcomes: list[Outcome] = []
    finished: list[StagedFile | Prepared] = []
    current: list[StagedFile | Prepared] = []

    def begin(headers: dict[str, str]) -> Callable[[bytes], None]:
        media, _ = multipart.parse_header_params(headers.get("content-type", "application/dicom"))
        if media != "application/dicom":
            refusal = Refused(CANNOT_UNDERSTAND, f"A part of type {media} is not application/dicom")
            current.append(Prepared(refusal=refusal))
            return lambda data: None
        staged = archive.blobs.stage()
        current.append(staged)
        return staged.write

    def end() -> None:
        finished.append(current.pop())

    def prepare(item: StagedFile | Prepared) -> asyncio.Future[Prepared]:
        if isinstance(item, StagedFile):
            return loop.run_in_executor(None, archive.prepare, item, study)
        refused: asyncio.Future[Prepared] = loop.create_future()
        refused.set_result(item)
        return refused

    def discard_current() -> None:  # a part the body ended inside of
        for item in current:
            if isinstance(item, StagedFile):
                item.discard()

    reader = multipart.PartReader(boundary, begin, end)
    try:
        async for chunk in request.stream():
            reader.feed(chunk)
            pending += [prepare(item) for item in finished]
            finished.clear()
            if len(pending) >= STOW_BATCH:
                outcomes += await archive.commit(list(await asyncio.gather(*pending)))
                pending = []
        reader.finish()
    except (MultipartParseError, ClientDisconnect) as exc:
        discard_current()
        outcomes += await archive.commit(list(await asyncio.gather(*pending)))
        if isinstance(exc, ClientDisconnect):
            raise
        raise DicomWebError(400, f"Malformed multipart body: {exc}") from None
    discard_current()
    outcomes += await archive.commit(list(await asyncio.gather(*pending)))
    return outcomes


def stow_response(outcomes: list[Outcome], base_url: str) -> dict[str, Any]:
    """The STOW-RS response (PS3.18 10.5.3): the study's RetrieveURL only where something
    was stored in it, and an item per instance naming it as far as it could be read."""
    referenced = []
    failed = []
    for o in outcomes:
        item: dict[str, Any] = {
            "00081150": qido.element_or_empty("ReferencedSOPClassUID", o.sop_class),
            "00081155": qido.element_or_empty("ReferencedSOPInstanceUID", o.sop),
        }
        if o.ok:
            item["00081190"] = qido.element(
                "RetrieveURL", f"{base_url}/studies/{o.study}/series/{o.series}/instances/{o.sop}"
            )
            referenced.append(item)
        else:
            item["00081197"] = qido.element("FailureReason", o.status)
            failed.append(item)
    body: dict[str, Any] = {}
    studies = {o.study for o in outcomes if o.ok}
    if len(studies) == 1:
        body["00081190"] = qido.element("RetrieveURL", f"{base_url}/studies/{studies.pop()}")
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    return body


# --- QIDO-RS ------------------------------------------------------------------------------


def _json_accepted(request: Request) -> None:
    for media in multipart.accept(request.headers.get("accept")):
        if media.media_type in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return
    raise DicomWebError(406, "QIDO-RS answers application/dicom+json only")


async def _search(request: Request, level: str, scope: dict[str, str]) -> Response:
    _json_accepted(request)
    try:
        wado.check_uids(*scope.values())
        query = qido.parse(level, request.query_params.multi_items(), scope)
    except (qido.QueryError, wado.BadRequest) as exc:
        raise DicomWebError(400, str(exc)) from None
    results, more = await qido.search(archive_of(request).index, query, base(request), wado.web_syntax)
    warnings = []
    if query.unsupported:
        names = ", ".join(sorted(set(query.unsupported)))
        warnings.append(warning(f"The following query parameters are not supported and were ignored: {names}"))
    if more and query.limit == qido.MAX_LIMIT:  # cut by the server's maximum, not the client's limit
        warnings.append(warning("The number of results exceeded the maximum supported by the server. "
                                "Additional results can be requested with offset."))
    headers = {"Warning": ", ".join(warnings)} if warnings else {}
    return Response(qido.encode(results), 200, media_type=DICOM_JSON, headers=headers)


@dicomweb("search-studies", "GET", "/studies")
async def search_studies(request: Request) -> Response:
    return await _search(request, "study", {})


@dicomweb("search-series", "GET", "/series")
async def search_all_series(request: Request) -> Response:
    return await _search(request, "series", {})


@dicomweb("search-series", "GET", "/studies/{study}/series")
async def search_series(request: Request, study: str) -> Response:
    return await _search(request, "series", {"StudyInstanceUID": study})


@dicomweb("search-instances", "GET", "/instances")
async def search_all_instances(request: Request) -> Response:
    return await _search(request, "instance", {})


@dicomweb("search-instances", "GET", "/studies/{study}/instances")
async def search_study_instances(request: Request, study: str) -> Response:
    return await _search(request, "instance", {"StudyInstanceUID": study})


@dicomweb("search-instances", "GET", "/studies/{study}/series/{series}/instances")
async def search_instances(request: Request, study: str, series: str) -> Response:
    return await _search(request, "instance", {"StudyInstanceUID": study, "SeriesInstanceUID": series})


# --- WADO-RS: instances ---------------------------------------------------------------------


def _dicom_syntaxes(request: Request, instance: bool) -> tuple[bool, list[str]]:
    """Whether to answer single-part application/dicom, and the acceptable transfer syntaxes
    in that form (PS3.18 8.7.3.5.2: none named means Explicit VR Little Endian). The form is
    the first acceptable one; single part is for an Instance resource only (10.4.4)."""
    wanted: dict[bool, list[str]] = {}
    for media in multipart.accept(request.headers.get("accept")):
        if media.media_type in ("*/*", "multipart/*") or (
            media.media_type == "multipart/related" and media.part_type in (None, "application/dicom")
        ):
            single = False
        elif media.media_type == "application/dicom" and instance:
            single = True
        else:
            continue
        wanted.setdefault(single, []).append(media.transfer_syntax or wado.EXPLICIT_LE)
    if not wanted:
        raise DicomWebError(406, 'Instances are sent as multipart/related; type="application/dicom"'
                                 + (", or one as application/dicom" if instance else ""))
    single = next(iter(wanted))
    return single, wanted[single]


async def _retrieve(request: Request, study: str, series: str | None, sop: str | None) -> Response:
    archive = archive_of(request)
    single, wanted = _dicom_syntaxes(request, sop is not None)
    stored = await guarded(wado.instances(archive, study, series, sop))
    try:
        syntax = wado.choose_syntax(stored, wanted)
        as_stored = all(wado.sent_syntax(item, syntax) == item.transfer_syntax for item in stored)
        held = {} if as_stored else await asyncio.to_thread(wado.transcode_ahead, archive, stored, syntax)
    except wado.NotAcceptable as exc:
        raise DicomWebError(406, str(exc)) from None

    def media_type(item: wado.Stored) -> str:
        # the syntax of each part (PS3.18 8.7.8.2: with "*", it may differ between parts)
        return f"application/dicom; transfer-syntax={wado.sent_syntax(item, syntax)}"

    def length(item: wado.Stored) -> list[tuple[str, str]]:
        return [("Content-Length", str(item.size))] if wado.sent_syntax(item, syntax) == item.transfer_syntax else []

    if single:
        item = stored[0]
        return StreamingResponse(_instance(archive, item, syntax, held), media_type=media_type(item), headers=dict(length(item)))
    boundary = multipart.boundary()

    async def bodies() -> AsyncIterator[tuple[str, Iterable[tuple[str, str]], AsyncIterator[bytes]]]:
        for item in stored:
            yield media_type(item), length(item), _instance(archive, item, syntax, held)

    headers: dict[str, str] = {}
    if as_stored:  # sizes known
        sized = ((media_type(item), length(item), item.size) for item in stored)
        headers["Content-Length"] = str(multipart.body_length(boundary, sized))
    return StreamingResponse(
        multipart.parts(boundary, bodies()), headers=headers,
        media_type=multipart.content_type("application/dicom", boundary, None if syntax == "*" else syntax),
    )


async def _instance(archive: Archive, item: wado.Stored, syntax: str, held: dict[str, bytes]) -> AsyncIterator[bytes]:
    """One instance's bytes in `syntax`: as transcoded ahead (`held`, let go once sent), or
    read (and transcoded again) now."""
    if item.sop in held:
        yield held.pop(item.sop)
        return
    if wado.sent_syntax(item, syntax) == item.transfer_syntax and item.size <= IN_LOOP_READ:
        yield archive.blobs.read(item.blob)  # one pread from the page cache
        return
    chunks = wado.instance_bytes(archive, item, syntax)
    while True:
        chunk = await asyncio.to_thread(next, chunks, None)
        if chunk is None:
            return
        yield chunk


@dicomweb("retrieve-study", "GET", "/studies/{study}")
async def retrieve_study(request: Request, study: str) -> Response:
    return await _retrieve(request, study, None, None)


@dicomweb("retrieve-series", "GET", "/studies/{study}/series/{series}")
async def retrieve_series(request: Request, study: str, series: str) -> Response:
    return await _retrieve(request, study, series, None)


@dicomweb("retrieve-instance", "GET", "/studies/{study}/series/{series}/instances/{sop}")
async def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
    return await _retrieve(request, study, series, sop)


# --- WADO-RS: metadata ----------------------------------------------------------------------


async def _metadata(request: Request, study: str, series: str | None, sop: str | None) -> Response:
    _json_accepted(request)
    body = await guarded(wado.metadata(archive_of(request), base(request), study, series, sop))
    return Response(body, 200, media_type=DICOM_JSON)


@dicomweb("retrieve-metadata", "GET", "/studies/{study}/metadata")
async def study_metadata(request: Request, study: str) -> Response:
    return await _metadata(request, study, None, None)


@dicomweb("retrieve-metadata", "GET", "/studies/{study}/series/{series}/metadata")
async def series_metadata(request: Request, study: str, series: str) -> Response:
    return await _metadata(request, study, series, None)


@dicomweb("retrieve-metadata", "GET", "/studies/{study}/series/{series}/instances/{sop}/metadata")
async def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
    return await _metadata(request, study, series, sop)


# --- WADO-RS: frames and bulk data ----------------------------------------------------------


def _frame_forms(request: Request, stored_media: str, stored_syntax: str) -> list[tuple[bool, str]]:
    """The acceptable forms of a frames response (PS3.18 8.7.3.5.3), best first: (as stored?,
    part media type). Octet-stream without a transfer syntax means uncompressed; `*` or the
    stored media type, as stored, unless it names another transfer syntax of that media type
    (a JPEG baseline frame is not the JPEG lossless one asked for). A range taking any type
    (`*/*`, multipart/related without one) takes compressed frames uncompressed first, and
    as stored (in their own media type, which it also takes) when they cannot be decoded."""
    forms: list[tuple[bool, str]] = []
    for media in multipart.accept(request.headers.get("accept")):
        part = media.part_type if media.media_type == "multipart/related" else media.media_type
        if part in (None, "*/*", "application/octet-stream"):
            as_stored = media.transfer_syntax == "*" or stored_media == "application/octet-stream"
            forms.append((as_stored, "application/octet-stream"))
            if part != "application/octet-stream" and not as_stored:
                forms.append((True, stored_media))
        elif part == stored_media and media.transfer_syntax in (None, "*", stored_syntax):
            forms.append((True, stored_media))
    if not forms:
        raise DicomWebError(406, f"The frames are available as application/octet-stream or {stored_media}")
    return forms


@dicomweb("retrieve-frames", "GET", "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}", first=True)
async def retrieve_frames(request: Request, study: str, series: str, sop: str, frames: str) -> Response:
    archive = archive_of(request)
    numbers = _frame_numbers(frames)
    table = await guarded(wado.frame_source(archive, study, series, sop))
    return await _frames_response(request, archive, table, numbers)


def _frame_numbers(text: str) -> list[int]:
    try:
        return wado.parse_frame_list(text)
    except wado.BadRequest as exc:
        raise DicomWebError(400, str(exc)) from None


async def _frames_response(request: Request, archive: Archive, table: FrameTable, numbers: list[int]) -> Response:
    """Frames as multipart/related, in the first acceptable form (`_frame_forms`) they can be
    given in. Frames to decode are decoded before the response starts (`wado.decoded_frames`),
    once: one that cannot be is a 406, or the first acceptable form without decoding, never
    a broken 200. A few frames are answered from memory, many are streamed."""
    stored_media = wado.FRAME_MEDIA_TYPES.get(table.transfer_syntax, "application/octet-stream")
    forms = _frame_forms(request, stored_media, table.transfer_syntax)
    try:
        wado.check_frames(table, numbers)
    except wado.NotFound as exc:
        raise DicomWebError(404, str(exc)) from None
    if table.transfer_syntax == wado.EXPLICIT_BE:  # swapped to little endian: can it be?
        await guarded(asyncio.to_thread(wado.frame_swap_unit, archive, table))
    as_stored, part_type = forms[0]
    decoded: list[wado.Frame] | None = None
    if wado.needs_decoding(table, as_stored):
        try:
            decoded = await asyncio.to_thread(wado.decoded_frames, archive, table, numbers)
        except wado.NotAcceptable as exc:  # the first acceptable form without decoding, if any
            undecoded = [form for form in forms if not wado.needs_decoding(table, form[0])]
            if not undecoded:
                raise DicomWebError(406, str(exc)) from None
            as_stored, part_type = undecoded[0]
    # a Big Endian frame is swapped after the read (`wado.frame`): in a thread
    reads_only = decoded is None and table.transfer_syntax != wado.EXPLICIT_BE
    boundary = multipart.boundary()

    async def parts() -> AsyncIterator[bytes]:
        for index, number in enumerate(numbers):
            if decoded is not None:
                item = decoded[index]
            elif reads_only and index < 16:
                item = wado.frame(archive, table, number)  # a pread from the page cache
            else:
                item = await asyncio.to_thread(wado.frame, archive, table, number)
            # every part has the response's `type` (RFC 2387), naming the frame's syntax
            media = part_type + (f"; transfer-syntax={item.transfer_syntax}" if item.transfer_syntax else "")
            header = multipart.part_header(boundary, media, [("Content-Length", str(len(item.data)))])
            yield (b"\r\n" if index else b"") + header + item.data
        yield multipart.closing(boundary)

    syntax = table.transfer_syntax if as_stored and part_type != "application/octet-stream" else None
    media_type = multipart.content_type(part_type, boundary, syntax)
    if len(numbers) <= 16:
        return Response(b"".join([chunk async for chunk in parts()]), 200, media_type=media_type)
    return StreamingResponse(parts(), 200, media_type=media_type)


@dicomweb("retrieve-bulkdata", "GET", "/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}")
async def retrieve_bulkdata(request: Request, study: str, series: str, sop: str, tag: str) -> Response:
    tag = tag.upper()
    if tag == "7FE00010":
        table = await guarded(wado.frame_source(archive_of(request), study, series, sop))
        return await _frames_response(request, archive_of(request), table, list(range(1, table.count + 1)))
    if not (len(tag) == 8 and all(c in "0123456789ABCDEF" for c in tag)):
        raise DicomWebError(400, f"{tag!r} is not a tag (8 hexadecimal digits)")
    data = await guarded(wado.bulkdata(archive_of(request), study, series, sop, tag))
    boundary = multipart.boundary()
    body = multipart.part_header(boundary, "application/octet-stream", [("Content-Length", str(len(data)))]) + data + multipart.closing(boundary)
    return Response(body, 200, media_type=multipart.content_type("application/octet-stream", boundary))


# --- WADO-RS: rendered and thumbnails ---------------------------------------------------------


RENDERED_TYPES = ("image/jpeg", "image/png")  # the first is the default (PS3.18 Table 8.7.4-1)


def _image_type(request: Request) -> str:
    """The rendered media type: from the `accept` query parameter when there is one, else
    from the Accept header.

    PS3.18 8.3.5 says "All Retrieve transactions for Rendered Media Types shall support
    these parameters", and its Table 8.3.5-1 starts with `accept` (8.3.3.1), which is how
    a hyperlink (an <img src>) asks for a type. Per 8.3.3.1 its types have no wildcards
    and "shall be compatible with a media range in the Accept Header Field"; DICOM and
    non-DICOM types together are a 400; and "If none of the Acceptable Media Types ... are
    supported by the origin server, the origin server response shall be in the default
    Media Type for the Resource Category", image/jpeg for images."""
    header = multipart.accept(request.headers.get("accept"))
    parameter = ",".join(request.query_params.getlist("accept"))
    if parameter:
        asked = [media.media_type for media in multipart.accept(parameter)]  # best first
        if any(t.startswith("application/dicom") for t in asked) and any(not t.startswith("application/dicom") for t in asked):
            raise DicomWebError(400, "The accept parameter mixes DICOM and non-DICOM media types")
        compatible = [t for t in asked if "*" not in t and _accepted_by(t, header)]
        if not compatible:
            raise DicomWebError(406, "The accept parameter names no media type the Accept header allows")
        for media_type in compatible:
            if media_type in RENDERED_TYPES:
                return media_type
        return RENDERED_TYPES[0]
    for media in header:
        if media.media_type in RENDERED_TYPES:
            return media.media_type
        if media.media_type in ("*/*", "image/*"):
            return RENDERED_TYPES[0]
    raise DicomWebError(406, "Rendered images are available as image/jpeg or image/png")


def _accepted_by(media_type: str, header: list[multipart.MediaRange]) -> bool:
    """Whether the Accept header's media ranges take `media_type` (RFC 9110 12.5.1)."""
    kind = media_type.split("/")[0] + "/*"
    return any(media.media_type in (media_type, kind, "*/*") for media in header)


async def _rendered(
    request: Request, study: str, series: str, sop: str | None, frame: int | None, thumbnail: bool
) -> Response:
    """A rendered frame (`frame`) or instance (None: its first frame, or for a whole slide
    image its Total Pixel Matrix, wsi_rendered.py)."""
    archive = archive_of(request)
    media_type = _image_type(request)
    if sop is None:
        stored = await guarded(wado.instances(archive, study, series))
        middle = stored[len(stored) // 2]
        # a slide's series shows its tissue (a level), not the label with the patient's name
        series, sop = middle.series, await wsi_rendered.smallest_level(archive, study, middle.series) or middle.sop
    assert series is not None
    table = await guarded(wado.frame_source(archive, study, series, sop))
    try:
        options = wado.rendering(dict(request.query_params), media_type, thumbnail)
    except wado.BadRequest as exc:
        raise DicomWebError(400, str(exc)) from None
    if table.slide is not None:
        image = await guarded(wsi_rendered.render(archive, table, frame, options))
    else:
        image = await guarded(asyncio.to_thread(wado.render, archive, table, frame or 1, options))
    return Response(image, 200, media_type=media_type)


@dicomweb("retrieve-rendered", "GET", "/studies/{study}/series/{series}/instances/{sop}/rendered")
async def rendered_instance(request: Request, study: str, series: str, sop: str) -> Response:
    return await _rendered(request, study, series, sop, None, False)


@dicomweb("retrieve-rendered", "GET", "/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered")
async def rendered_frame(request: Request, study: str, series: str, sop: str, frame: str) -> Response:
    numbers = _frame_numbers(frame)
    if len(numbers) != 1:
        raise DicomWebError(400, "A rendered frame is one frame number")
    return await _rendered(request, study, series, sop, numbers[0], False)


@dicomweb("retrieve-thumbnail", "GET", "/studies/{study}/series/{series}/instances/{sop}/thumbnail")
async def thumbnail_instance(request: Request, study: str, series: str, sop: str) -> Response:
    return await _rendered(request, study, series, sop, None, True)


@dicomweb("retrieve-thumbnail", "GET", "/studies/{study}/series/{series}/thumbnail")
async def thumbnail_series(request: Request, study: str, series: str) -> Response:
    return await _rendered(request, study, series, None, None, True)


# --- delete (an extension: PS3.18 defines no delete) ------------------------------------------


async def _delete(request: Request, study: str, series: str | None, sop: str | None) -> Response:
    try:
        wado.check_uids(study, series, sop)
    except wado.BadRequest as exc:
        raise DicomWebError(400, str(exc)) from None
    removed = await archive_of(request).delete(study, series, sop)
    if not removed:
        raise DicomWebError(404, wado.missing(study, series, sop))
    return Response(status_code=204)


@dicomweb("delete", "DELETE", "/studies/{study}")
async def delete_study(request: Request, study: str) -> Response:
    return await _delete(request, study, None, None)


@dicomweb("delete", "DELETE", "/studies/{study}/series/{series}")
async def delete_series(request: Request, study: str, series: str) -> Response:
    return await _delete(request, study, series, None)


@dicomweb("delete", "DELETE", "/studies/{study}/series/{series}/instances/{sop}")
async def delete_instance(request: Request, study: str, series: str, sop: str) -> Response:
    return await _delete(request, study, series, sop)
