"""The TensorFlow Serving REST API on the standard library's ``ThreadingHTTPServer``.

Routes (as TF Serving):

* ``POST /v1/models/NAME[/versions/V|/labels/L]:predict`` with ``{"instances": [...]}`` (row
  format, answered with ``{"predictions": ...}``) or ``{"inputs": ...}`` (columnar format,
  answered with ``{"outputs": ...}``), plus an optional ``"signature_name"``.
* ``GET /v1/models/NAME[/versions/V|/labels/L]``: version status.
* ``GET /v1/models/NAME[/versions/V|/labels/L]/metadata``: signature_def map.

Tensor values follow TF Serving's JSON mapping (:mod:`serving.rest_json`). Errors are
``{"error": "..."}`` with HTTP 400 (bad request), 404 (unknown model, version, signature,
route), 408 (the client stopped sending the body), 411 (no Content-Length and not chunked),
413 (body over ``--max_request_bytes``: by Content-Length before reading anything, or while
reading a chunked body), 501 (classify/regress), 503 (the model ran out of resources, or
its batch queue is full with ``--enable_batching``), 504 (``--request_timeout_seconds``
exceeded) or 500.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Mapping, Optional, Tuple

from serving import grpc_service
from serving.limits import Deadline, RequestLimits
from serving.model_manager import (
    Code,
    LoadedVersion,
    ModelManager,
    ServingError,
    invalid,
    not_found,
)
from serving.rest_json import format_predict, parse_predict_body

log = logging.getLogger("dnc.serving")

HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.FAILED_PRECONDITION: 400,
    Code.RESOURCE_EXHAUSTED: 503,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
}
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_VERSION = re.compile(r"[0-9]{1,18}")
_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:[A-Za-z]+)?$"
)


class RestServer(ThreadingHTTPServer):
    """HTTP server whose handler threads are joined on close (graceful shutdown)."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, host: str, port: int, manager: ModelManager, limits: RequestLimits) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.manager = manager
        self.limits = limits
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: RestServer
    server_version = "dnc-serving"
    timeout = 30  # seconds of client silence before a connection is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("rest %s - %s", self.address_string(), format % args)

    def _send(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def send_error(
        self, code: int, message: Optional[str] = None, explain: Optional[str] = None
    ) -> None:
        """Answers protocol-level errors of ``http.server`` (malformed request line, URI too
        long, unsupported method, ...) as JSON like every other error."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # not parsed yet: still send a status line
            self.request_version = "HTTP/1.0"
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def _route(self) -> Tuple[str, Optional[int], str, str]:
        path = urllib.parse.urlsplit(self.path).path
        match = _ROUTE.match(path)
        if match is None:
            raise not_found(f"unknown path {path!r}; expected /v1/models/NAME[...]")
        name = urllib.parse.unquote(match["name"])
        version = None
        if match["version"] is not None:
            if not _VERSION.fullmatch(match["version"]):
                raise invalid(f"invalid version {match['version']!r}: expects an integer")
            version = int(match["version"])
        label = urllib.parse.unquote(match["label"] or "")
        return name, version, label, match["suffix"] or ""

    def _handle(self, method: str) -> None:
        deadline = self.server.limits.deadline()
        try:
            body = self._read_json(deadline) if method == "POST" else {}
            name, version, label, suffix = self._route()
            manager = self.server.manager
            if method == "GET" and suffix == "":
                if label:
                    version = manager.get(name, None, label).version
                response = grpc_service.status_response(manager, name, version)
                self._send(200, _to_dict(response))
            elif method == "GET" and suffix == "/metadata":
                self._send(200, self._metadata(manager.get(name, version, label)))
            elif method == "POST" and suffix == ":predict":
                loaded = manager.get(name, version, label)
                self._send(200, self._predict(loaded, body, deadline))
            elif method == "POST" and suffix in (":classify", ":regress"):
                raise ServingError(
                    Code.UNIMPLEMENTED, f"{suffix[1:]} is not supported; use predict"
                )
            else:
                raise not_found(f"no route for {method} {suffix or 'status'}")
        except ServingError as e:
            log.info("rest %s %s -> %s: %s", method, self.path, e.code.value, e.message)
            self._error(HTTP_STATUS[e.code], e.message)
        except _HttpError as e:
            log.info("rest %s %s -> %d: %s", method, self.path, e.status, e)
            self._error(e.status, str(e))
            self._lingering_close()
        except Exception as e:  # unexpected: HTTP 500 with the message, keep serving
            log.exception("rest %s %s failed", method, self.path)
            self._error(500, f"{type(e).__name__}: {e}")

    def _metadata(self, loaded: LoadedVersion) -> Dict[str, Any]:
        return {
            "model_spec": {
                "name": loaded.name,
                "signature_name": "",
                "version": str(loaded.version),
            },
            "metadata": {"signature_def": _to_dict(grpc_service.signature_def_map(loaded))},
        }

    def _read_json(self, deadline: Deadline) -> Dict[str, Any]:
        raw = self._read_body(deadline)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise invalid(f"the body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        return body

    def _read_body(self, deadline: Deadline) -> bytes:
        """Reads at most ``max_request_bytes`` of body (Content-Length or chunked).

        Raises:
            _HttpError: 400/411 for bad framing, 413 over the limit (by Content-Length
                before reading anything), 408 when the client stops sending.
            ServingError: DEADLINE_EXCEEDED when the request timeout passes meanwhile.
        """
        limit = self.server.limits.max_request_bytes
        lengths = self.headers.get_all("Content-Length") or []
        encoding = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if encoding and lengths:
            raise _HttpError(400, "send either Content-Length or Transfer-Encoding, not both")
        if encoding:
            if encoding != "chunked":
                raise _HttpError(400, f"unsupported Transfer-Encoding {encoding!r}")
            return self._read_chunked(limit, deadline)
        if not lengths:
            raise _HttpError(411, "Content-Length (or Transfer-Encoding: chunked) is required")
        if len(set(lengths)) != 1 or not _CONTENT_LENGTH.fullmatch(lengths[0].strip()):
            raise _HttpError(400, f"invalid Content-Length {', '.join(lengths)!r}")
        length = int(lengths[0])
        if length > limit:
            raise _HttpError(413, _too_large(f"{length} bytes", limit))
        return self._read_exact(length, deadline)

    def _read_chunked(self, limit: int, deadline: Deadline) -> bytes:
        body = bytearray()
        while True:
            line = self._read_line(deadline)
            size_text = line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise _HttpError(400, f"malformed chunk size line {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                for _ in range(64):  # trailer fields, then an empty line
                    if self._read_line(deadline).strip() == b"":
                        return bytes(body)
                raise _HttpError(400, "too many chunked trailer fields")
            if len(body) + size > limit:
                raise _HttpError(413, _too_large(f"more than {len(body) + size} bytes", limit))
            body += self._read_exact(size, deadline)
            if self._read_line(deadline).strip() != b"":
                raise _HttpError(400, "a chunk is not followed by CRLF")

    def _timed(self, deadline: Deadline) -> None:
        """Bounds the next socket read by the handler timeout and the request deadline."""
        deadline.check("while reading the request body")
        left = deadline.remaining()
        self.connection.settimeout(self.timeout if left is None else min(left, self.timeout))

    def _read_line(self, deadline: Deadline) -> bytes:
        self._timed(deadline)
        try:
            line = self.rfile.readline(1025)
        except TimeoutError:
            deadline.check("while reading the request body")
            raise _HttpError(408, "timed out waiting for the request body") from None
        if len(line) > 1024:
            raise _HttpError(400, "chunked framing line longer than 1024 bytes")
        if not line:
            raise _HttpError(400, "the chunked body ended early")
        return line

    def _read_exact(self, n: int, deadline: Deadline) -> bytes:
        parts: List[bytes] = []
        left = n
        while left > 0:
            self._timed(deadline)
            try:
                part = self.rfile.read1(min(left, 65536))
            except TimeoutError:
                deadline.check("while reading the request body")
                raise _HttpError(408, "timed out waiting for the request body") from None
            if not part:
                raise _HttpError(400, f"the body ended after {n - left} of {n} bytes")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def _lingering_close(self) -> None:
        """Drains what the client still sends (bounded) so that closing does not reset the
        connection before it has read the error response."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            drained = 0
            while drained < 4 * self.server.limits.max_request_bytes:
                data = self.connection.recv(65536)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass

    def _predict(
        self, loaded: LoadedVersion, body: Mapping[str, Any], deadline: Deadline
    ) -> Dict[str, Any]:
        signature_name = body.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid("'signature_name' must be a string")
        sig = loaded.signature(signature_name)
        inputs, row_format = parse_predict_body(body, sig)
        outputs = loaded.run(sig.name, inputs, (), self.server.limits, deadline)
        return format_predict(outputs, row_format)

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")


class _HttpError(Exception):
    """A transport-level error (body framing and size), answered with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _too_large(size: str, limit: int) -> str:
    return f"request body of {size} exceeds the limit of {limit} bytes (--max_request_bytes)"


def _to_dict(message: Any) -> Dict[str, Any]:
    from google.protobuf import json_format

    try:
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, including_default_value_fields=True
        )
    except TypeError:  # protobuf >= 5 renamed the flag
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
