"""multipart/related on the wire (PS3.18 8.6 and RFC 2387): Accept and Content-Type
parameters, reading a request body part by part as it streams in (python-multipart's
callback parser, so no part is ever held whole in memory), and writing responses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser

# RFC 2046 5.1.1: a boundary has 1 to 70 characters. python-multipart fails past 256 with
# an error of its own (a 500), and no conforming client sends more than 70.
MAX_BOUNDARY = 70


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One Accept entry: `multipart/related; type="application/dicom"; transfer-syntax=*`."""

    media_type: str
    part_type: str | None
    transfer_syntax: str | None
    quality: float


def parse_header_params(value: str) -> tuple[str, dict[str, str]]:
    media, *params = _split(value, ";")
    parsed: dict[str, str] = {}
    for param in params:
        name, _, val = param.partition("=")
        parsed[name.strip().lower()] = val.strip().strip('"')
    return media.strip().lower(), parsed


def accept(header: str | None) -> list[MediaRange]:
    """The Accept header's media ranges, best first (`*/*` when absent)."""
    ranges = []
    for item in _split(header or "*/*", ","):
        if not item.strip():
            continue
        media, params = parse_header_params(item)
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 1.0
        if quality <= 0:
            continue
        part_type = params.get("type")
        ranges.append(MediaRange(media, part_type.lower() if part_type else None, params.get("transfer-syntax"), quality))
    return sorted(ranges, key=lambda r: -r.quality)


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes (the type parameter is quoted)."""
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


@dataclass
class PartReader:
    """Feeds a multipart body to a sink: `begin(headers)` returns a writer per part,
    `end()` is called when the part is complete."""

    boundary: str
    begin: Callable[[dict[str, str]], Callable[[bytes], None]]
    end: Callable[[], None]
    _headers: dict[str, str] = field(default_factory=dict)
    _name: bytes = b""
    _value: bytes = b""
    _write: Callable[[bytes], None] | None = None
    parts: int = 0

    def __post_init__(self) -> None:
        self._parser = MultipartParser(
            self.boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._part_end,
            },
            max_header_count=32,
        )

    def feed(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()

    def _part_begin(self) -> None:
        self._headers = {}
        self._name = self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._name = self._value = b""

    def _headers_finished(self) -> None:
        self._write = self.begin(self._headers)

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._write is not None
        self._write(data[start:end])

    def _part_end(self) -> None:
        self.parts += 1
        self._write = None
        self.end()


def boundary() -> str:
    return uuid.uuid4().hex


def content_type(part_type: str, boundary_: str, transfer_syntax: str | None = None) -> str:
    value = f'multipart/related; type="{part_type}"; boundary={boundary_}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def part_header(boundary_: str, media_type: str, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"--{boundary_}", f"Content-Type: {media_type}", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def closing(boundary_: str) -> bytes:
    return f"\r\n--{boundary_}--\r\n".encode()


def body_length(boundary_: str, sized: Iterable[tuple[str, Iterable[tuple[str, str]], int]]) -> int:
    """The length of the body `parts` streams for parts of these (media type, extra
    headers, body size). Sent as Content-Length it spares HTTP/1.1 chunked framing, which
    costs a copy of every byte on both sides (study retrieval measured 20-40% faster)."""
    total = len(closing(boundary_))
    for index, (media_type, extra, size) in enumerate(sized):
        total += (2 if index else 0) + len(part_header(boundary_, media_type, extra)) + size
    return total


async def parts(
    boundary_: str, bodies: AsyncIterator[tuple[str, Iterable[tuple[str, str]], AsyncIterator[bytes]]]
) -> AsyncIterator[bytes]:
    """A multipart/related body from (media type, extra headers, body chunks) of each part,
    streamed."""
    first = True
    async for media_type, extra, chunks in bodies:
        yield (b"" if first else b"\r\n") + part_header(boundary_, media_type, extra)
        first = False
        async for chunk in chunks:
            yield chunk
    yield closing(boundary_)
