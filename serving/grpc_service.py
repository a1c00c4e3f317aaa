"""gRPC servicers for ``tensorflow.serving.PredictionService`` and ``ModelService``.

Also holds the proto builders (signature maps, model status) shared with the REST API.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.model_manager import (
    PREDICT_METHOD,
    Code,
    LoadedVersion,
    ModelManager,
    ServingError,
    invalid,
)

log = logging.getLogger("dnc.serving")

GRPC_CODES = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}


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


def predict(manager: ModelManager, request: Any, max_elements: int) -> Any:
    """Answers a ``PredictRequest`` (tensors converted with ``tf.make_ndarray``)."""
    import tensorflow as tf

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
            got = tf.dtypes.DType(proto.dtype).name if proto.dtype else "DT_INVALID"
            raise invalid(f"input {key!r}: expects dtype {spec.dtype.name}, got {got}")
        if proto.tensor_shape.unknown_rank:
            raise invalid(f"input {key!r}: tensor_shape has unknown rank")
        size = 1
        for dim in proto.tensor_shape.dim:
            if dim.size < 0:
                raise invalid(f"input {key!r}: negative dimension {dim.size}")
            size *= dim.size
        if max_elements and size > max_elements:
            raise invalid(f"input {key!r} has {size} elements, more than the limit {max_elements}")
        try:
            inputs[key] = tf.make_ndarray(proto)
        except (TypeError, ValueError) as e:
            raise invalid(f"input {key!r}: malformed TensorProto: {e}") from e
    outputs = loaded.run(sig.name, inputs, list(request.output_filter), max_elements)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = loaded.name
    response.model_spec.version.value = loaded.version
    response.model_spec.signature_name = sig.name
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response


def _call(context: grpc.ServicerContext, method: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ServingError as e:
        log.info("%s -> %s: %s", method, e.code.value, e.message)
        context.abort(GRPC_CODES[e.code], e.message)
    except Exception as e:  # unexpected: report INTERNAL with the message, keep serving
        log.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata."""

    def __init__(self, manager: ModelManager, max_elements: int) -> None:
        self._manager = manager
        self._max_elements = max_elements

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Runs a signature on the request's input tensors."""
        return _call(context, "Predict", predict, self._manager, request, self._max_elements)

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Returns the signature_def map of a model version."""
        return _call(context, "GetModelMetadata", metadata_response, self._manager, request)

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
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        if spec.WhichOneof("version_choice") == "version_label":
            try:
                version = self._manager.get(spec.name, None, spec.version_label).version
            except ServingError as e:
                context.abort(GRPC_CODES[e.code], e.message)
        return _call(context, "GetModelStatus", status_response, self._manager, spec.name, version)

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Not supported: UNIMPLEMENTED (restart with a new --model_config_file)."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "HandleReloadConfigRequest is not supported")


def add_servicers(server: grpc.Server, manager: ModelManager, max_elements: int) -> None:
    """Registers both services on a gRPC server."""
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(manager, max_elements), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), server)
