"""A TensorFlow Serving API compatible model server (gRPC + REST) for this project.

Stock ``tensorflow_model_server`` cannot load the project's SavedModels (ScaNN custom ops),
so this server speaks the same API (``tensorflow.serving.PredictionService`` /
``ModelService`` over gRPC, the ``/v1/models`` REST API) with the same flags::

    dnc serve --model_name=dnc --model_base_path=/models/dnc --port=8500 --rest_api_port=8501

``--enable_batching`` / ``--batching_parameters_file`` batch concurrent requests
(:mod:`serving.batching`); ``--tensorflow_intra_op_parallelism`` /
``--tensorflow_inter_op_parallelism`` size TensorFlow's thread pools.

The :class:`Server` class runs it in-process (tests); :func:`run_serve` is the CLI entry.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import threading
from concurrent import futures
from typing import Any, List, Optional, Sequence

from preprocessing.errors import EXIT_USAGE
from serving.batching_config import BatchingParameters, load_batching_parameters
from serving.limits import (
    DEFAULT_MAX_HISTORY_LENGTH,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_REQUEST_ELEMENTS,
    DEFAULT_REQUEST_TIMEOUT_SECONDS,
    RequestLimits,
)
from serving.model_manager import (
    Loader,
    ModelConfig,
    ModelManager,
    parse_model_config_text,
)

log = logging.getLogger("dnc.serving")

# gRPC requests accepted at once (running + waiting for one of --grpc_workers threads).
# 8x the default pool: far above the 32 clients of the benchmark, yet a burst cannot grow
# the queue (and its memory) without bound; each waiting request also has its deadline.
DEFAULT_MAX_CONCURRENT_RPCS = 128


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """gRPC + REST model server over a :class:`ModelManager`.

    Args:
        models: the models to serve.
        host: interface to bind (loopback by default; anything else is logged).
        grpc_port: gRPC port (0 picks a free port; read :attr:`grpc_port` after start).
        rest_port: REST port (0 picks a free port); None disables REST.
        poll_wait_seconds: interval between scans of the base paths (<= 0: only at start).
        max_request_bytes: largest gRPC message / REST body accepted.
        max_request_elements: largest total number of input elements per request.
        max_history_length: largest history length (items per row) per request.
        request_timeout_seconds: longest time spent on one request (<= 0: no server
            limit; a gRPC client's deadline always applies).
        grpc_workers: size of the gRPC thread pool.
        max_concurrent_rpcs: most gRPC requests accepted at once, running or waiting for a
            worker; one more is answered RESOURCE_EXHAUSTED at once, so the queue in front
            of the workers is bounded by count as well as by deadline (<= 0: no bound).
        loader: SavedModel loader (default: ``serving.export.load_exported`` if present,
            else ``tf.saved_model.load``).
        batching: request batching settings (``--enable_batching``; None: every request
            is its own graph call); see :mod:`serving.batching`.
    """

    def __init__(
        self,
        models: Sequence[ModelConfig],
        host: str = "127.0.0.1",
        grpc_port: int = 8500,
        rest_port: Optional[int] = 8501,
        poll_wait_seconds: float = 1.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_request_elements: int = DEFAULT_MAX_REQUEST_ELEMENTS,
        grpc_workers: int = 16,
        loader: Optional[Loader] = None,
        max_history_length: int = DEFAULT_MAX_HISTORY_LENGTH,
        request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS,
        batching: Optional[BatchingParameters] = None,
        max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    ) -> None:
        if not models:
            raise ValueError("at least one model is required")
        if grpc_workers < 1:
            raise ValueError(f"grpc_workers must be >= 1, got {grpc_workers}")
        self.batcher: Any = None
        if batching is not None:
            from serving.batching import RequestBatcher

            self.batcher = RequestBatcher(batching)
        self.limits = RequestLimits(
            max_request_bytes=max_request_bytes,
            max_elements=max_request_elements,
            max_history_length=max_history_length,
            timeout_seconds=request_timeout_seconds,
        )
        self.manager = ModelManager(models, poll_wait_seconds, loader, self.batcher)
        self.host = host
        self._requested_grpc_port = grpc_port
        self._requested_rest_port = rest_port
        self.max_request_bytes = max_request_bytes
        self.max_request_elements = max_request_elements
        self.grpc_workers = grpc_workers
        self.max_concurrent_rpcs = max_concurrent_rpcs if max_concurrent_rpcs > 0 else None
        self.grpc_port: Optional[int] = None
        self.rest_port: Optional[int] = None
        self._grpc: Any = None
        self._rest: Any = None
        self._rest_thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()

    def start(self) -> None:
        """Loads the initial versions, then starts the gRPC and REST servers and polling.

        Raises:
            RuntimeError: if a port cannot be bound.
        """
        import grpc

        from serving import grpc_service, rest

        if not is_loopback(self.host):
            log.warning(
                "binding %s (--host): the server is reachable from other hosts, with no "
                "authentication or TLS; put it behind a proxy that provides them",
                self.host,
            )
        if self.batcher is not None:
            self.batcher.start()
            log.info("request batching: %s", self.batcher.params)
        self.manager.poll_all()
        options = [
            ("grpc.max_receive_message_length", self.max_request_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(self.grpc_workers, thread_name_prefix="grpc"),
            options=options,
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
        )
        grpc_service.add_servicers(self._grpc, self.manager, self.limits)
        address = f"[{self.host}]" if ":" in self.host else self.host
        port = self._grpc.add_insecure_port(f"{address}:{self._requested_grpc_port}")
        if not port:
            raise RuntimeError(f"cannot bind gRPC to {address}:{self._requested_grpc_port}")
        self.grpc_port = port
        if self._requested_rest_port is not None:
            self._rest = rest.RestServer(
                self.host, self._requested_rest_port, self.manager, self.limits
            )
            self.rest_port = self._rest.server_address[1]
        self._grpc.start()
        if self._rest is not None:
            self._rest_thread = threading.Thread(
                target=self._rest.serve_forever, name="rest", daemon=True
            )
            self._rest_thread.start()
        self.manager.start()
        log.info(
            "serving %s: gRPC %s:%d, REST %s",
            sorted(self.manager.models),
            self.host,
            self.grpc_port,
            f"{self.host}:{self.rest_port}" if self.rest_port else "disabled",
        )

    def stop(self, grace: float = 5.0) -> None:
        """Stops accepting requests, lets in-flight ones finish (up to ``grace`` s), stops."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        done = self._grpc.stop(grace) if self._grpc is not None else None
        if self._rest is not None:
            if self._rest_thread is not None:
                self._rest.shutdown()  # stops accepting new connections
            self._rest.server_close()  # joins the threads of in-flight requests
        if done is not None:
            done.wait(grace + 1)
        if self.batcher is not None:
            self.batcher.stop(grace + 1)
        self.manager.stop()
        log.info("server stopped")

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until :meth:`stop` has been called; returns whether it was."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``tensorflow_model_server``-style flags of ``dnc serve``."""
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500)")
    parser.add_argument(
        "--rest_api_port", type=int, default=8501, help="REST port (default 8501; 0 disables)"
    )
    parser.add_argument("--model_name", default="default", help="name of the single model")
    parser.add_argument("--model_base_path", help="directory of integer version directories")
    parser.add_argument(
        "--model_config_file", help="text-format ModelServerConfig (several models)"
    )
    parser.add_argument(
        "--file_system_poll_wait_seconds",
        type=float,
        default=1.0,
        help="interval between scans for new versions (default 1; <= 0 scans only at start)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1, loopback only; anything else is logged "
        "with a warning: the server has no authentication or TLS)",
    )
    parser.add_argument(
        "--max_request_bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest gRPC message / REST body (default 4 MiB)",
    )
    parser.add_argument(
        "--max_request_elements",
        type=int,
        default=DEFAULT_MAX_REQUEST_ELEMENTS,
        help="largest number of input elements per request "
        f"(default {DEFAULT_MAX_REQUEST_ELEMENTS})",
    )
    parser.add_argument(
        "--max_history_length",
        type=int,
        default=DEFAULT_MAX_HISTORY_LENGTH,
        help=f"largest history length per row (default {DEFAULT_MAX_HISTORY_LENGTH})",
    )
    parser.add_argument(
        "--request_timeout_seconds",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_SECONDS,
        help="longest time spent on one request, answered DEADLINE_EXCEEDED / HTTP 504 "
        f"(default {DEFAULT_REQUEST_TIMEOUT_SECONDS:g}; <= 0: none; gRPC client deadlines "
        "always apply)",
    )
    parser.add_argument("--grpc_workers", type=int, default=16, help="gRPC thread pool size")
    parser.add_argument(
        "--grpc_max_concurrent_rpcs",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_RPCS,
        help="most gRPC requests accepted at once, running or queued for a worker; more are "
        f"answered RESOURCE_EXHAUSTED (default {DEFAULT_MAX_CONCURRENT_RPCS}; <= 0: no bound)",
    )
    parser.add_argument(
        "--enable_batching",
        nargs="?",
        const=True,
        default=False,
        type=parse_bool,
        help="batch concurrent requests of one model version and signature into one graph "
        "call (as TF Serving; --enable_batching or --enable_batching=true)",
    )
    parser.add_argument(
        "--batching_parameters_file",
        default="",
        help="BatchingParameters text proto (max_batch_size, batch_timeout_micros, "
        "max_enqueued_batches, num_batch_threads); needs --enable_batching; default: "
        "TF Serving's defaults",
    )
    parser.add_argument(
        "--tensorflow_intra_op_parallelism",
        type=int,
        default=0,
        help="threads of TensorFlow's intra-op pool (default 0: TensorFlow's choice)",
    )
    parser.add_argument(
        "--tensorflow_inter_op_parallelism",
        type=int,
        default=0,
        help="threads of TensorFlow's inter-op pool (default 0: TensorFlow's choice)",
    )
    parser.add_argument(
        "--grace_seconds", type=float, default=10.0, help="time to finish in-flight requests"
    )


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no), as TF Serving's boolean flags.

    Raises:
        argparse.ArgumentTypeError: for anything else.
    """
    value = str(text).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def batching_from_args(args: argparse.Namespace) -> Optional[BatchingParameters]:
    """The batching settings of ``--enable_batching`` / ``--batching_parameters_file``.

    Raises:
        ValueError: a parameters file without ``--enable_batching`` (as TF Serving), or a
            file that cannot be read or parsed.
    """
    path = getattr(args, "batching_parameters_file", "") or ""
    if not getattr(args, "enable_batching", False):
        if path:
            raise ValueError("--batching_parameters_file is set without --enable_batching")
        return None
    if not path:
        return BatchingParameters()
    params = load_batching_parameters(path)
    if params.ignored:
        log.warning(
            "--batching_parameters_file %s: %s have no effect in this server",
            path,
            ", ".join(params.ignored),
        )
    return params


def configure_tf_threads(intra_op: int = 0, inter_op: int = 0) -> None:
    """Sizes TensorFlow's intra- and inter-op thread pools (0 leaves TensorFlow's default).

    Must run before TensorFlow executes its first operation (``run_serve`` calls it
    before anything is loaded).

    Raises:
        ValueError: a negative count, or TensorFlow already initialized.
    """
    if intra_op < 0 or inter_op < 0:
        raise ValueError(
            "--tensorflow_intra_op_parallelism and --tensorflow_inter_op_parallelism must be "
            f">= 0, got {intra_op} and {inter_op}"
        )
    if not intra_op and not inter_op:
        return
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as e:
        raise ValueError(f"cannot set TensorFlow's thread pools: {e}") from e
    intra, inter = intra_op or "default", inter_op or "default"
    log.info("TensorFlow threads: intra-op %s, inter-op %s", intra, inter)


def model_configs_from_args(args: argparse.Namespace) -> List[ModelConfig]:
    """Builds the model list from ``--model_config_file`` or ``--model_name/base_path``.

    Raises:
        ValueError: when neither or both are given, or the config is invalid.
    """
    if args.model_config_file and args.model_base_path:
        raise ValueError("use either --model_config_file or --model_base_path, not both")
    if args.model_config_file:
        with open(args.model_config_file, encoding="utf-8") as f:
            return parse_model_config_text(f.read())
    if not args.model_base_path:
        raise ValueError("--model_base_path (or --model_config_file) is required")
    return [ModelConfig(args.model_name, os.path.abspath(args.model_base_path))]


def run_serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the exit code (0 on a clean stop)."""
    try:
        models = model_configs_from_args(args)
        batching = batching_from_args(args)
        configure_tf_threads(
            getattr(args, "tensorflow_intra_op_parallelism", 0),
            getattr(args, "tensorflow_inter_op_parallelism", 0),
        )
    except (OSError, ValueError) as e:
        log.error("serve: %s", e)
        return EXIT_USAGE
    rest_port = args.rest_api_port or None
    try:
        server = Server(
            models,
            host=args.host,
            grpc_port=args.port,
            rest_port=rest_port,
            poll_wait_seconds=args.file_system_poll_wait_seconds,
            max_request_bytes=args.max_request_bytes,
            max_request_elements=args.max_request_elements,
            grpc_workers=args.grpc_workers,
            max_concurrent_rpcs=args.grpc_max_concurrent_rpcs,
            max_history_length=args.max_history_length,
            request_timeout_seconds=args.request_timeout_seconds,
            batching=batching,
        )
    except ValueError as e:
        log.error("serve: %s", e)
        return EXIT_USAGE
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop_requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start()
        except RuntimeError as e:
            log.error("serve: %s", e)
            server.stop(0)
            return 1
        while not stop_requested.wait(0.5):
            pass
        server.stop(args.grace_seconds)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
