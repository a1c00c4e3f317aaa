"""Strategies and client helpers for hostile-request property tests of the server."""

from __future__ import annotations

import base64
import http.client
import json
import math
from typing import Any, Dict, Optional, Tuple

import grpc
import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

MAX_BYTES = 256 * 1024
MAX_ELEMENTS = 20_000
MAX_HISTORY = 64
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,  # writes nothing into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Statuses a hostile request may get; anything else (UNKNOWN, INTERNAL, ...) is a server bug.
CLEAN_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}
CLEAN_HTTP = {200, 400, 404, 411, 413, 501}
PATH_LIKE = [
    "../secret",
    "..",
    ".",
    "/etc",
    "/etc/passwd",
    "a/b",
    "m/../../secret",
    "secret/..",
    "m\0",
    "\0",
    "..\\secret",
    "m\n",
    "%2e%2e",
    "~",
    "",
    "m" * 129,
]
NAMES = st.one_of(
    st.just("m"),
    st.sampled_from(PATH_LIKE),
    st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True),
    st.text(max_size=12),
)


def count_outcome(text: str) -> None:
    """Counts outcomes for ``--hypothesis-show-statistics``."""
    if currently_in_test_context():
        event(text)


def call(method: Any, request: Any) -> Tuple[grpc.StatusCode, Any]:
    """Returns (OK, response) or (error code, details)."""
    try:
        answer = grpc.StatusCode.OK, method(request, timeout=20)
    except grpc.RpcError as e:
        answer = e.code(), e.details()
    count_outcome(f"gRPC {answer[0].name}")
    return answer


def assert_clean(code: grpc.StatusCode, details: Any, what: Any) -> None:
    """Checks an error is one a hostile request may get, with a message."""
    assert code in CLEAN_ERRORS, (code, details, what)
    assert isinstance(details, str) and details, (code, what)


def rest(
    served: Dict[str, Any], method: str, path: str, body: Optional[bytes] = None
) -> Tuple[int, Any]:
    """Returns (HTTP status, parsed JSON body); the body must always be JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", served["server"].rest_port, timeout=20)
    try:
        headers = {} if body is None else {"Content-Length": str(len(body))}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        count_outcome(f"HTTP {response.status}")
        return response.status, json.loads(response.read())
    finally:
        conn.close()


ids = st.one_of(st.binary(max_size=12), st.text(max_size=8).map(lambda t: t.encode("utf-8")))
NUMERIC = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_]


@st.composite
def arrays(draw: Any, strings: Optional[bool] = None, shapes: Any = None) -> np.ndarray:
    """Arrays of random dtype, rank and shape, including long and empty histories."""
    shape = draw(
        shapes
        if shapes is not None
        else st.one_of(
            st.lists(st.integers(0, 4), max_size=3).map(tuple),
            st.tuples(st.integers(0, 3), st.integers(0, 5)),
            st.sampled_from([(1, MAX_HISTORY), (1, MAX_HISTORY + 1), (2, 3000), (0, 10**6)]),
            st.sampled_from([(MAX_ELEMENTS // 10 + 1, 10), (0,), (1, 0), ()]),
        )
    )
    if math.prod(shape) > MAX_ELEMENTS + 1000:
        shape = (1, MAX_HISTORY + 1)  # keeps the request under the size limit
    if strings or (strings is None and draw(st.booleans())):
        flat = draw(st.lists(ids, min_size=1, max_size=4))
        size = math.prod(shape)
        return np.array((flat * (size // len(flat) + 1))[:size], dtype=object).reshape(shape)
    dtype = draw(st.sampled_from(NUMERIC))
    if math.prod(shape) > 64:
        return np.zeros(shape, dtype)
    return draw(hnp.arrays(dtype, shape))


INPUT_NAMES = st.sampled_from(["history", "alpha", "num_results", "examples", "x"])
# Mostly valid requests with one or two things wrong, so that both outcomes are exercised.
ROWS = st.tuples(st.integers(0, 3), st.integers(0, 6))
REQUEST_INPUTS = st.one_of(
    st.fixed_dictionaries({"history": arrays(strings=True, shapes=ROWS)}),
    st.fixed_dictionaries({"history": arrays(strings=True)}),
    st.fixed_dictionaries({"history": arrays()}),
    st.dictionaries(INPUT_NAMES, arrays(), max_size=3),
)

DTYPE_ENUMS = st.one_of(st.integers(0, 30), st.integers(100, 120), st.integers(-5, 2**31 - 1))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
b64 = st.binary(max_size=6).map(lambda b: {"b64": base64.b64encode(b).decode()})
rows = st.lists(st.lists(st.text(max_size=5) | b64, min_size=2, max_size=2), max_size=3)
