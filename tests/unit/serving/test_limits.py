"""Request limits, deadlines, and name/version/config validation of the server."""

from __future__ import annotations

import time

import numpy as np
import pytest
from tensorflow.core.example import example_pb2

from serving.errors import Code, ServingError
from serving.limits import (
    Deadline,
    RequestLimits,
    check_history_lengths,
    check_num_results,
    clean_tf_message,
)
from serving.model_config import (
    ModelConfig,
    parse_model_config_text,
    parse_version_dir,
    validate_model_name,
)


def _example(n: int) -> bytes:
    example = example_pb2.Example()
    example.features.feature["history"].bytes_list.value.extend([b"i"] * n)
    return example.SerializeToString()


def _code(fn, *args) -> tuple:
    with pytest.raises(ServingError) as info:
        fn(*args)
    return info.value.code, info.value.message


def test_history_lengths_of_history_and_serialized_examples():
    check_history_lengths({"history": np.empty((3, 4), object)}, 4)
    code, message = _code(check_history_lengths, {"history": np.empty((0, 5), object)}, 4)
    assert code == Code.INVALID_ARGUMENT and "length 5" in message and "limit of 4" in message
    examples = np.array([_example(4), _example(0), b""], dtype=object)
    check_history_lengths({"examples": examples}, 4)
    examples = np.array([_example(1), _example(5)], dtype=object)
    code, message = _code(check_history_lengths, {"examples": examples}, 4)
    assert message.startswith("examples[1] has a history of length 5, more than the limit of 4")
    code, message = _code(check_history_lengths, {"examples": np.array([b"\xff\xff"], object)}, 4)
    assert code == Code.INVALID_ARGUMENT and "not a serialized tf.Example" in message


def test_num_results_bounds():
    check_num_results({"num_results": np.int32(5)}, 5)
    check_num_results({"num_results": np.int32(10**6)}, None)  # unknown max: the model checks
    check_num_results({"num_results": np.float32(-1)}, 5)  # not an integer: the spec check's job
    assert _code(check_num_results, {"num_results": np.int32(6)}, 5) == (
        Code.INVALID_ARGUMENT,
        "num_results 6 exceeds this model's max_num_results 5",
    )
    assert _code(check_num_results, {"num_results": np.int64(-3)}, None)[1] == (
        "num_results must be >= 0, got -3"
    )


def test_request_limits_and_deadlines():
    for bad in (
        {"max_request_bytes": 0},
        {"max_elements": -1},
        {"max_history_length": 1.5},
        {"max_history_length": True},
        {"timeout_seconds": float("nan")},
    ):
        with pytest.raises(ValueError):
            RequestLimits(**bad)
    limits = RequestLimits(timeout_seconds=5)
    assert limits.deadline().source == "the server's --request_timeout_seconds"
    assert limits.deadline(client_remaining=1.0).source == "the client's deadline"
    assert limits.deadline(client_remaining=9.0).budget == 5
    assert RequestLimits(timeout_seconds=0).deadline().remaining() is None
    assert RequestLimits(timeout_seconds=0).deadline(2.0).budget == 2.0
    Deadline(None).check("never")
    deadline = Deadline(0.05, "a test")
    deadline.check("early")
    time.sleep(0.06)
    code, message = _code(deadline.check, "late")
    assert (
        code == Code.DEADLINE_EXCEEDED
        and message == "deadline exceeded late: a test allowed 0.050s"
    )


def test_clean_tf_message():
    raw = (
        "Graph execution error:\n\nDetected at node assert_less_equal/Assert/Assert defined at "
        "(most recent call last):\n<stack traces unavailable>\nassertion failed: [num_results "
        "must be <= 10] [x (n:0) = ] [11]\n\t [[{{node assert_less_equal/Assert/Assert}}]] "
        "[Op:__inference_signature_wrapper_f_128]"
    )
    assert (
        clean_tf_message(raw) == "assertion failed: [num_results must be <= 10] [x (n:0) = ] [11]"
    )
    raw = "{{function_node __wrapped__Reshape_device_/job:localhost}} Input to reshape [Op:Reshape]"
    assert clean_tf_message(raw) == "Input to reshape"
    assert clean_tf_message("\n") == "the model rejected the inputs"


def test_model_names():
    for name in ("m", "dnc-1.2_b", "a" * 128, "v.1"):
        assert validate_model_name(name) == name
    for name in (
        "",
        ".",
        "..",
        "../m",
        "a/b",
        "/etc",
        "a\\b",
        "a..b",
        "m\n",
        "m\0",
        "a b",
        "é",
        "a" * 129,
        "%2e",
        None,
        3,
    ):
        with pytest.raises(ValueError):
            validate_model_name(name)


def test_version_directory_names():
    assert [parse_version_dir(v) for v in ("0", "1", "42", "9" * 18)] == [0, 1, 42, int("9" * 18)]
    for name in ("01", "+1", "-1", "1.0", "1e3", " 1", "1\n", "9" * 19, "\u0661", "", "x", "0x1"):
        assert parse_version_dir(name) is None, name


def test_model_config_file_validation(tmp_path):
    base = str(tmp_path)
    ok = parse_model_config_text(
        f"model_config_list {{ config {{ name: 'm' base_path: '{base}' "
        "version_labels { key: 'stable' value: 1 } } }"
    )
    assert ok == [ModelConfig("m", base, {"stable": 1})]
    hostile = [
        f"model_config_list {{ config {{ name: '../m' base_path: '{base}' }} }}",
        f"model_config_list {{ config {{ name: 'm\\n' base_path: '{base}' }} }}",
        f"model_config_list {{ config {{ name: 'm' base_path: '{base}' "
        "version_labels { key: 'a/b' value: 1 } } }",
        "model_config_list { config { name: 'm' base_path: '/x\\000y' } }",
        "model_config_list { config { name: 'm' base_path: '' } }",
        f"model_config_list {{ config {{ name: 'm' base_path: '{base}' model_platform: 'x' }} }}",
        "custom_model_config { }",
        "model_config_list { }",
        "!!python/object:os.system 'x'",
    ]
    for text in hostile:
        with pytest.raises(ValueError):
            parse_model_config_text(text)
