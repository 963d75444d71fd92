"""The HTTP/1.1 protocol the server runs: uvicorn's httptools protocol, whose answer to a
request too malformed to reach the application (an unknown method, a NUL in the request
line, a broken header) is a FHIR OperationOutcome instead of uvicorn's plain text.

Such a request never gets a path, so its interface is unknown; the OperationOutcome is
the error form of the server's main API, and JSON any client can read.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.fhir.outcome import Issue, outcome_bytes


class HttpProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        body = outcome_bytes([Issue("structure", f"{msg} The request line or headers are not HTTP/1.1 (RFC 9112).")])
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/fhir+json; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
