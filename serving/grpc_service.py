"""gRPC servicers for ``tensorflow.serving.PredictionService`` and ``ModelService``.

Also holds the proto builders (signature maps, model status) shared with the REST API.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.limits import Deadline, RequestLimits
from serving.model_manager import (
    PREDICT_METHOD,
    Code,
    LoadedVersion,
    ModelManager,
    ServingError,
    invalid,
)

log = logging.getLogger("dnc.serving")

GRPC_CODES = {code: grpc.StatusCode[code.value] for code in Code}


class MalformedRequest:
    """Stands for a request message that could not be parsed (answered INVALID_ARGUMENT)."""

    def __init__(self, error: str) -> None:
        self.error = error


def _dtype_name(enum_value: int) -> str:
    import tensorflow as tf

    try:
        return tf.dtypes.DType(enum_value).name if enum_value else "DT_INVALID"
    except (TypeError, ValueError, KeyError):
        return f"unknown dtype enum {enum_value}"


def resolve(manager: ModelManager, model_spec: Any) -> LoadedVersion:
    """Returns the loaded version a ``ModelSpec`` asks for (latest, version or label)."""
    version: Optional[int] = None
    label = ""
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version":
        version = int(model_spec.version.value)
    elif choice == "version_label":
        label = model_spec.version_label
    return manager.get(model_spec.name, version, label)


def signature_def_map(loaded: LoadedVersion) -> Any:
    """Builds a ``SignatureDefMap`` (names, dtypes, shapes) from a loaded version."""
    result = get_model_metadata_pb2.SignatureDefMap()
    for name, info in loaded.signatures.items():
        sig = result.signature_def[name]
        sig.method_name = PREDICT_METHOD
        for section, specs in ((sig.inputs, info.inputs), (sig.outputs, info.outputs)):
            for key, spec in specs.items():
                tensor = section[key]
                tensor.name = f"{key}:0"
                tensor.dtype = spec.dtype.as_datatype_enum
                tensor.tensor_shape.CopyFrom(spec.shape.as_proto())
    return result


def metadata_response(manager: ModelManager, request: Any) -> Any:
    """Answers a ``GetModelMetadataRequest``."""
    fields = list(request.metadata_field)
    if fields != ["signature_def"]:
        raise invalid(f"metadata_field must be ['signature_def'], got {fields}")
    loaded = resolve(manager, request.model_spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = loaded.name
    response.model_spec.version.value = loaded.version
    response.metadata["signature_def"].Pack(signature_def_map(loaded))
    return response


def status_response(manager: ModelManager, name: str, version: Optional[int]) -> Any:
    """Answers a model status query (all versions, or one)."""
    model = manager.model(name)
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in model.statuses(version):
        entry = response.model_version_status.add()
        entry.version = status.version
        entry.state = status.state.value
        if status.error:
            entry.status.error_code = 2  # tensorflow.error.UNKNOWN
            entry.status.error_message = status.error
    return response


def predict(
    manager: ModelManager,
    request: Any,
    limits: RequestLimits,
    deadline: Optional[Deadline] = None,
) -> Any:
    """Answers a ``PredictRequest`` (tensors converted with ``tf.make_ndarray``).

    Shapes are checked against the signature and the limits before any tensor is built.
    """
    import tensorflow as tf

    max_elements = limits.max_elements
    loaded = resolve(manager, request.model_spec)
    sig = loaded.signature(request.model_spec.signature_name)
    inputs: Dict[str, np.ndarray] = {}
    for key, proto in request.inputs.items():
        spec = sig.inputs.get(key)
        if spec is None:
            raise invalid(
                f"unknown input {key!r} for signature {sig.name!r} (expects {sorted(sig.inputs)})"
            )
        if proto.dtype != spec.dtype.as_datatype_enum:
            got = _dtype_name(proto.dtype)
            raise invalid(f"input {key!r}: expects dtype {spec.dtype.name}, got {got}")
        if proto.tensor_shape.unknown_rank:
            raise invalid(f"input {key!r}: tensor_shape has unknown rank")
        dims = [dim.size for dim in proto.tensor_shape.dim]
        if spec.shape.rank is not None and len(dims) != spec.shape.rank:
            raise invalid(
                f"input {key!r}: expects rank {spec.shape.rank} (shape {spec.shape}), "
                f"got rank {len(dims)} (shape {dims})"
            )
        size = 1
        for size_of_dim in dims:
            if size_of_dim < 0:
                raise invalid(f"input {key!r}: negative dimension {size_of_dim}")
            size *= size_of_dim
        if size > max_elements:
            raise invalid(
                f"input {key!r} has {size} elements, more than the limit of {max_elements} "
                "(--max_request_elements)"
            )
        if len(dims) >= 2 and dims[-1] > limits.max_history_length and key == "history":
            raise invalid(
                f"input 'history' has rows of length {dims[-1]}, more than the limit of "
                f"{limits.max_history_length} (--max_history_length)"
            )
        try:
            inputs[key] = tf.make_ndarray(proto)
        except (TypeError, ValueError, UnicodeError, MemoryError) as e:
            raise invalid(f"input {key!r}: malformed TensorProto: {e}") from e
    outputs = loaded.run(sig.name, inputs, list(request.output_filter), limits, deadline)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = loaded.name
    response.model_spec.version.value = loaded.version
    response.model_spec.signature_name = sig.name
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response


def _call(
    context: grpc.ServicerContext,
    method: str,
    request: Any,
    answer: Callable[[], Any],
    deadline: Optional[Deadline] = None,
) -> Any:
    """Returns ``answer()``, turning errors into gRPC statuses (never an unhandled raise)."""
    try:
        if isinstance(request, MalformedRequest):
            raise invalid(f"malformed {method} request: {request.error}")
        if deadline is not None:
            deadline.check("before the request was handled")
        return answer()
    except ServingError as e:
        log.info("%s -> %s: %s", method, e.code.value, e.message)
        context.abort(GRPC_CODES[e.code], e.message)
    except Exception as e:  # unexpected: report INTERNAL with the message, keep serving
        log.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata."""

    def __init__(self, manager: ModelManager, limits: RequestLimits) -> None:
        self._manager = manager
        self._limits = limits

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Runs a signature on the request's input tensors (within the request deadline)."""
        deadline = self._limits.deadline(context.time_remaining())
        return _call(
            context,
            "Predict",
            request,
            lambda: predict(self._manager, request, self._limits, deadline),
            deadline,
        )

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Returns the signature_def map of a model version."""
        return _call(
            context, "GetModelMetadata", request, lambda: metadata_response(self._manager, request)
        )

    def _unimplemented(self, method: str, context: grpc.ServicerContext) -> None:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not supported by this server; use Predict",
        )

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Not supported: UNIMPLEMENTED."""
        self._unimplemented("Classify", context)

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Not supported: UNIMPLEMENTED."""
        self._unimplemented("Regress", context)

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Not supported: UNIMPLEMENTED."""
        self._unimplemented("MultiInference", context)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Returns the state of every version (or of the requested one)."""
        return _call(context, "GetModelStatus", request, lambda: self._status(request))

    def _status(self, request: Any) -> Any:
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        if spec.WhichOneof("version_choice") == "version_label":
            version = self._manager.get(spec.name, None, spec.version_label).version
        return status_response(self._manager, spec.name, version)

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Not supported: UNIMPLEMENTED (restart with a new --model_config_file)."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "HandleReloadConfigRequest is not supported")


class _Collector:
    """Receives the generic handlers the generated ``add_*_to_server`` functions register."""

    def __init__(self) -> None:
        self.handlers: list = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.handlers.extend(handlers)


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # DecodeError and friends: answered INVALID_ARGUMENT
            return MalformedRequest(f"{type(e).__name__}: {e}")

    return deserialize


class _LenientHandler(grpc.GenericRpcHandler):
    """Wraps a generic handler so unparsable messages reach the servicer as
    :class:`MalformedRequest` (INVALID_ARGUMENT) instead of gRPC's INTERNAL."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: Any) -> Any:
        handler = self._inner.service(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=_lenient(handler.request_deserializer))


def add_servicers(server: grpc.Server, manager: ModelManager, limits: RequestLimits) -> None:
    """Registers both services on a gRPC server (malformed messages -> INVALID_ARGUMENT)."""
    collector = _Collector()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(manager, limits), collector
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), collector)
    server.add_generic_rpc_handlers(tuple(_LenientHandler(h) for h in collector.handlers))
