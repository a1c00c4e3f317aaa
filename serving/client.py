"""Clients of the TensorFlow Serving API (gRPC and REST) and the ``dnc query`` command.

Example::

    client = PredictClient("localhost:8500", "dnc")
    out = client.retrieve(["12", "7", "3"], num_results=20, alpha=1.0)
    out["item_ids"], out["scores"], out["clusters"]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO, Union

import numpy as np

from preprocessing.errors import EXIT_USAGE

log = logging.getLogger("dnc.serving")

RETRIEVE_SIGNATURE = "retrieve"
FILTERED_SIGNATURE = "retrieve_filtered"
DEFAULT_ALPHA = 1.0  # same default as trainer.merges.DEFAULT_ALPHA
DEFAULT_NUM_RESULTS = 10
ArrayLike = Union[np.ndarray, List[Any], Any]


def _retrieve_inputs(
    history: Sequence[str],
    num_results: Optional[int],
    alpha: Optional[float],
    clusters: Optional[Sequence[int]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> Dict[str, np.ndarray]:
    """Inputs of ``serving_default``, ``retrieve`` or (with a filter) ``retrieve_filtered``."""
    if isinstance(history, (str, bytes)):
        raise ValueError("history must be a list of item ids, not a single string")
    items = np.array([[str(h).encode("utf-8") for h in history]], dtype=object).reshape(1, -1)
    inputs: Dict[str, np.ndarray] = {"history": items}
    filtered = clusters is not None or exclude is not None
    if num_results is not None or alpha is not None or filtered:
        n = DEFAULT_NUM_RESULTS if num_results is None else int(num_results)
        if n <= 0:
            raise ValueError(f"num_results must be > 0, got {n}")
        inputs["alpha"] = np.array(DEFAULT_ALPHA if alpha is None else alpha, dtype=np.float32)
        inputs["num_results"] = np.array(n, dtype=np.int32)
    if filtered:
        if isinstance(exclude, (str, bytes)):
            raise ValueError("exclude must be a list of item ids, not a single string")
        wanted = [int(c) for c in (clusters or [])]
        if any(c < 0 for c in wanted):
            raise ValueError(f"clusters must be cluster ids >= 0, got {wanted}")
        inputs["clusters"] = np.array([wanted], dtype=np.int32).reshape(1, -1)
        dropped = [str(e).encode("utf-8") for e in (exclude or [])]
        inputs["exclude"] = np.array([dropped], dtype=object).reshape(1, -1)
    return inputs


class _Retrieving:
    """``retrieve`` on top of a client's ``predict(inputs, signature)``."""

    signature_name: str

    def predict(self, inputs: Mapping[str, Any], signature: Optional[str] = None):
        raise NotImplementedError

    def retrieve(
        self,
        history: Sequence[str],
        num_results: Optional[int] = None,
        alpha: Optional[float] = None,
        clusters: Optional[Sequence[int]] = None,
        exclude: Optional[Sequence[str]] = None,
    ) -> Dict[str, np.ndarray]:
        """Retrieves items for one history.

        Uses the ``retrieve`` signature if M or alpha is given, ``retrieve_filtered`` if
        ``clusters`` (keep only these clusters) or ``exclude`` (item ids to leave out) is,
        and the client's signature otherwise.
        """
        inputs = _retrieve_inputs(history, num_results, alpha, clusters, exclude)
        if "clusters" in inputs:
            signature = FILTERED_SIGNATURE
        elif len(inputs) > 1:
            signature = RETRIEVE_SIGNATURE
        else:
            signature = self.signature_name
        return self.predict(inputs, signature)


class PredictClient(_Retrieving):
    """gRPC client of ``tensorflow.serving.PredictionService`` for one model.

    Args:
        target: ``host:port`` of the gRPC server.
        model_name: the served model.
        signature_name: default signature for :meth:`predict`.
        timeout: per-call deadline in seconds.
        version: a specific version to query (default: the latest).

    Calls raise ``grpc.RpcError`` on failure (``code()`` and ``details()`` explain why).
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        signature_name: str = "serving_default",
        timeout: float = 10,
        version: Optional[int] = None,
    ) -> None:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.model_name = model_name
        self.signature_name = signature_name
        self.timeout = timeout
        self.version = version
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def _spec(self, spec: Any, signature_name: str) -> None:
        spec.name = self.model_name
        spec.signature_name = signature_name
        if self.version is not None:
            spec.version.value = self.version

    def predict(
        self,
        inputs: Mapping[str, ArrayLike],
        signature_name: Optional[str] = None,
        output_filter: Sequence[str] = (),
    ) -> Dict[str, np.ndarray]:
        """Runs a signature; inputs are arrays or nested lists (str lists become strings)."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature_name or self.signature_name)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        request.output_filter.extend(output_filter)
        response = self._stub.Predict(request, timeout=self.timeout)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def metadata(self) -> Any:
        """Returns the ``GetModelMetadataResponse`` (signature_def) of the model."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, "")
        return self._stub.GetModelMetadata(request, timeout=self.timeout)

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> PredictClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def _to_array(value: Any) -> np.ndarray:
    converted = _from_json(value)
    array = np.asarray(converted)
    if array.dtype.kind in "SUO":
        array = np.array(converted, dtype=object)
    return array


class RestClient(_Retrieving):
    """REST client of the ``/v1/models`` API (columnar ``inputs`` format), same methods.

    Raises ``RuntimeError`` with the server's ``error`` message on an HTTP error.
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        signature_name: str = "serving_default",
        timeout: float = 10,
        version: Optional[int] = None,
    ) -> None:
        base = target if "://" in target else f"http://{target}"
        name = urllib.parse.quote(model_name, safe="")
        self.url = f"{base.rstrip('/')}/v1/models/{name}"
        if version is not None:
            self.url += f"/versions/{int(version)}"
        self.signature_name = signature_name
        self.timeout = timeout
        self._output_names: Dict[str, List[str]] = {}

    def _request(self, url: str, body: Optional[Dict[str, Any]] = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error", text)
            except ValueError:
                message = text
            raise RuntimeError(f"HTTP {e.code}: {message}") from e

    def metadata(self) -> Dict[str, Any]:
        """Returns the ``/metadata`` JSON of the model."""
        return self._request(self.url + "/metadata")

    def status(self) -> Dict[str, Any]:
        """Returns the model status JSON (``model_version_status``)."""
        return self._request(self.url)

    def predict(
        self, inputs: Mapping[str, ArrayLike], signature_name: Optional[str] = None
    ) -> Dict[str, np.ndarray]:
        """Runs a signature with the columnar format; returns arrays (strings as bytes)."""
        signature = signature_name or self.signature_name
        body = {"signature_name": signature, "inputs": {k: _to_json(v) for k, v in inputs.items()}}
        outputs = self._request(self.url + ":predict", body)["outputs"]
        if not isinstance(outputs, dict) or set(outputs) == {"b64"}:
            names = self._signature_outputs(signature)
            if len(names) != 1:
                raise RuntimeError(f"unnamed output but signature has outputs {names}")
            outputs = {names[0]: outputs}
        return {k: _to_array(v) for k, v in outputs.items()}

    def _signature_outputs(self, signature: str) -> List[str]:
        if signature not in self._output_names:
            sigs = self.metadata()["metadata"]["signature_def"]["signature_def"]
            self._output_names[signature] = sorted(sigs[signature]["outputs"])
        return self._output_names[signature]


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags of ``dnc query``."""
    parser.add_argument(
        "--server", default="localhost:8500", help="HOST:PORT (gRPC; REST with --rest)"
    )
    parser.add_argument("--model_name", default="default")
    parser.add_argument("--history", required=True, help="comma-separated item ids, oldest first")
    parser.add_argument("--num_results", type=int, default=None, help="M (retrieve signature)")
    parser.add_argument("--alpha", type=float, default=None, help="quota exponent")
    parser.add_argument(
        "--clusters", default=None, help="comma-separated cluster ids: only these clusters"
    )
    parser.add_argument("--exclude", default=None, help="comma-separated item ids to leave out")
    parser.add_argument("--rest", action="store_true", help="use the REST API")
    parser.add_argument("--signature_name", default="serving_default")
    parser.add_argument("--timeout", type=float, default=10.0)


def format_results(outputs: Mapping[str, np.ndarray]) -> str:
    """Formats ``item_ids`` / ``scores`` / ``clusters`` outputs as a text table."""

    def column(name: str) -> List[Any]:
        value = outputs.get(name)
        if value is None:
            return []
        value = np.asarray(value)
        return list(value[0] if value.ndim >= 2 else value.reshape(-1))

    items, scores, clusters = column("item_ids"), column("scores"), column("clusters")
    lines = [f"{'rank':>4}  {'item_id':<20}  {'score':>10}  {'cluster':>7}"]
    for i, item in enumerate(items):
        text = item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
        score = f"{float(scores[i]):10.4f}" if i < len(scores) else f"{'-':>10}"
        cluster = f"{int(clusters[i]):7d}" if i < len(clusters) else f"{'-':>7}"
        lines.append(f"{i + 1:>4}  {text:<20}  {score}  {cluster}")
    return "\n".join(lines)


def _id_list(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run_query(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Queries a server and prints the retrieved items; returns the exit code."""
    out = out if out is not None else sys.stdout
    history = _id_list(args.history)
    if not history:
        log.error("query: --history has no item ids")
        return EXIT_USAGE
    try:
        clusters = None if args.clusters is None else [int(c) for c in _id_list(args.clusters)]
    except ValueError:
        log.error("query: --clusters must be comma-separated integers, got %r", args.clusters)
        return EXIT_USAGE
    exclude = None if args.exclude is None else _id_list(args.exclude)
    request = (args.num_results, args.alpha, clusters, exclude)
    try:
        if args.rest:
            client: Any = RestClient(
                args.server, args.model_name, args.signature_name, args.timeout
            )
            outputs = client.retrieve(history, *request)
        else:
            import grpc

            with PredictClient(
                args.server, args.model_name, args.signature_name, args.timeout
            ) as client:
                try:
                    outputs = client.retrieve(history, *request)
                except grpc.RpcError as e:
                    log.error("query: %s: %s", e.code().name, e.details())
                    return 1
    except (RuntimeError, OSError, ValueError) as e:
        log.error("query: %s", e)
        return 1
    print(format_results(outputs), file=out)
    return 0
