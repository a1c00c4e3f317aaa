"""The TensorFlow Serving REST API on the standard library's ``ThreadingHTTPServer``.

Routes (as TF Serving):

* ``POST /v1/models/NAME[/versions/V|/labels/L]:predict`` with ``{"instances": [...]}`` (row
  format, answered with ``{"predictions": ...}``) or ``{"inputs": ...}`` (columnar format,
  answered with ``{"outputs": ...}``), plus an optional ``"signature_name"``.
* ``GET /v1/models/NAME[/versions/V|/labels/L]``: version status.
* ``GET /v1/models/NAME[/versions/V|/labels/L]/metadata``: signature_def map.

Strings are UTF-8 JSON strings; binary values are ``{"b64": "..."}`` (inputs) and outputs
whose name ends in ``_bytes`` or that are not valid UTF-8 are returned that way. Errors are
``{"error": "..."}`` with HTTP 400 (bad request), 404 (unknown model, version, signature,
route), 408 (the client stopped sending the body), 411 (no Content-Length and not chunked),
413 (body over ``--max_request_bytes``: by Content-Length before reading anything, or while
reading a chunked body), 501 (classify/regress), 503 (the model ran out of resources), 504
(``--request_timeout_seconds`` exceeded) or 500.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from serving import grpc_service
from serving.limits import Deadline, RequestLimits
from serving.model_manager import (
    Code,
    LoadedVersion,
    ModelManager,
    ServingError,
    SignatureInfo,
    invalid,
    not_found,
)

log = logging.getLogger("dnc.serving")

HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.FAILED_PRECONDITION: 400,
    Code.RESOURCE_EXHAUSTED: 503,
    Code.DEADLINE_EXCEEDED: 504,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
}
MAX_JSON_DEPTH = 32  # nesting of a tensor value (rank) in a request body
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_VERSION = re.compile(r"[0-9]{1,18}")
_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:[A-Za-z]+)?$"
)


def _flatten(value: Any, where: str, depth: int = 0) -> Tuple[Tuple[int, ...], List[Any]]:
    """Returns the shape of a rectangular nested JSON list and its leaves in order."""
    if depth > MAX_JSON_DEPTH:
        raise invalid(f"{where}: lists nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, list):
        if not value:
            return (0,), []
        shapes, leaves = [], []
        for item in value:
            shape, flat = _flatten(item, where, depth + 1)
            shapes.append(shape)
            leaves.extend(flat)
        if any(s != shapes[0] for s in shapes):
            raise invalid(f"{where}: ragged nested list (all rows must have the same shape)")
        return (len(value), *shapes[0]), leaves
    if isinstance(value, dict):
        if set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return (), [base64.b64decode(value["b64"], validate=True)]
            except ValueError as e:
                raise invalid(f"{where}: invalid base64 value: {e}") from e
        raise invalid(f"{where}: unexpected JSON object (only {{'b64': ...}} is allowed)")
    if value is None:
        raise invalid(f"{where}: null is not a tensor value")
    return (), [value]


def json_to_ndarray(value: Any, spec: Any, where: str) -> np.ndarray:
    """Converts a JSON value to an array of the spec's dtype (TF Serving's JSON mapping).

    Raises:
        ServingError: INVALID_ARGUMENT for ragged lists or values of the wrong type.
    """
    shape, leaves = _flatten(value, where)
    dtype = spec.dtype
    if dtype.name == "string":
        out = np.empty(len(leaves), dtype=object)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, str):
                try:
                    out[i] = leaf.encode("utf-8")
                except UnicodeEncodeError as e:  # lone surrogates such as "\ud800"
                    raise invalid(f"{where}: string is not valid Unicode ({e.reason})") from e
            elif isinstance(leaf, bytes):
                out[i] = leaf
            else:
                raise invalid(f"{where}: expects strings (dtype string), got {leaf!r}")
        return out.reshape(shape)
    if dtype.is_bool:
        ok = all(isinstance(v, bool) for v in leaves)
    elif dtype.is_integer:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in leaves)
    elif dtype.is_floating:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves)
    else:
        raise invalid(f"{where}: dtype {dtype.name} is not supported over JSON")
    if not ok:
        bad = next(iter(v for v in leaves if not isinstance(v, (int, float))), leaves[0])
        raise invalid(f"{where}: expects dtype {dtype.name}, got a value like {bad!r}")
    try:
        return np.asarray(leaves, dtype=dtype.as_numpy_dtype).reshape(shape)
    except OverflowError as e:
        raise invalid(f"{where}: value out of range for {dtype.name}: {e}") from e


def _leaf_to_json(value: Any, binary: bool) -> Any:
    if isinstance(value, bytes):
        if not binary:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def ndarray_to_json(name: str, array: np.ndarray) -> Any:
    """Converts an output array to JSON values (bytes as text, or b64 objects)."""
    if array.dtype.kind not in "OS":
        return array.tolist()
    binary = name.endswith("_bytes")

    def convert(v: Any) -> Any:
        return [convert(x) for x in v] if isinstance(v, list) else _leaf_to_json(v, binary)

    return convert(array.tolist())


def _single_input(sig: SignatureInfo, value: Any) -> bool:
    is_b64 = isinstance(value, dict) and set(value) == {"b64"}
    return len(sig.inputs) == 1 and (not isinstance(value, dict) or is_b64)


def parse_predict_body(body: Mapping[str, Any], sig: SignatureInfo) -> Tuple[Dict, bool]:
    """Returns (input arrays, row_format) for a predict request body."""
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise invalid("the request must have exactly one of 'instances' or 'inputs'")
    if has_cols:
        value = body["inputs"]
        if _single_input(sig, value):
            value = {next(iter(sig.inputs)): value}
        if not isinstance(value, dict):
            raise invalid(f"'inputs' must map input names {sorted(sig.inputs)} to values")
        return {k: _convert(sig, k, v, f"inputs[{k!r}]") for k, v in value.items()}, False
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise invalid("'instances' must be a non-empty list")
    if all(_single_input(sig, inst) for inst in instances):
        key = next(iter(sig.inputs))
        return {key: _convert(sig, key, instances, "instances")}, True
    if not all(isinstance(inst, dict) for inst in instances):
        raise invalid("every instance must be an object {input name: value} for this signature")
    names = set(instances[0])
    if any(set(inst) != names for inst in instances):
        raise invalid("every instance must have the same input names")
    return {
        k: _convert(sig, k, [inst[k] for inst in instances], f"instances[*][{k!r}]")
        for k in sorted(names)
    }, True


def _convert(sig: SignatureInfo, key: str, value: Any, where: str) -> np.ndarray:
    spec = sig.inputs.get(key)
    if spec is None:
        raise invalid(
            f"unknown input {key!r} for signature {sig.name!r} (expects {sorted(sig.inputs)})"
        )
    return json_to_ndarray(value, spec, where)


def format_predict(outputs: Mapping[str, np.ndarray], row_format: bool) -> Dict[str, Any]:
    """Formats outputs as ``{"predictions": ...}`` (row) or ``{"outputs": ...}``."""
    if not row_format:
        if len(outputs) == 1:
            ((name, value),) = outputs.items()
            return {"outputs": ndarray_to_json(name, value)}
        return {"outputs": {k: ndarray_to_json(k, v) for k, v in outputs.items()}}
    if len(outputs) == 1:
        ((name, value),) = outputs.items()
        if value.ndim == 0:
            raise invalid(f"output {name!r} is a scalar; use the columnar 'inputs' format")
        return {"predictions": ndarray_to_json(name, value)}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in outputs.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise invalid(
            f"outputs have different batch sizes {sizes}; use the columnar 'inputs' format"
        )
    columns = {k: ndarray_to_json(k, v) for k, v in outputs.items()}
    rows = next(iter(sizes.values()))
    return {"predictions": [{k: columns[k][i] for k in columns} for i in range(rows)]}


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
