"""``dnc pipeline run`` without a config: the whole stack on the embedded data set.

Runs the pipeline (preprocess, train ``dnc`` and ``sasrec``, evaluate, bless and
push the better one), serves the pushed model on free loopback ports, sends a few gRPC
queries, prints them and stops the server.
"""

from __future__ import annotations

import logging
import os
import time
from typing import List, Optional, TextIO

from pipeline.config import PipelineConfig, demo_config
from pipeline.runner import RunResult, run_pipeline

log = logging.getLogger(__name__)


def demo_histories(data_dir: str, count: int = 3, length: int = 5) -> List[List[str]]:
    """A few real user histories (raw item ids) from the validation split."""
    from preprocessing import features
    from trainer import data

    items = data.load_items(data_dir)
    held_out = data.evaluation_data(data_dir, features.VALIDATION, max_len=length)
    out = []
    for row in held_out.histories[:count]:
        out.append([str(items.item_ids[i - 1]) for i in row if i > 0])
    return out


def serve_and_query(
    serving_dir: str, model_name: str, histories: List[List[str]], out: TextIO
) -> int:
    """Serves ``serving_dir`` on free loopback ports and prints one query per history.

    Returns:
        The number of queries that returned items.
    """
    from serving.client import PredictClient, format_results
    from serving.model_manager import ModelConfig
    from serving.server import Server

    server = Server(
        [ModelConfig(name=model_name, base_path=os.path.abspath(serving_dir))],
        host="127.0.0.1",
        grpc_port=0,
        rest_port=None,
        poll_wait_seconds=0,
    )
    server.start()
    answered = 0
    try:
        target = f"127.0.0.1:{server.grpc_port}"
        print(f"\nserving {model_name} from {serving_dir} on grpc {target}", file=out)
        with PredictClient(target, model_name, timeout=60) as client:
            for history in histories:
                outputs = client.retrieve(history, num_results=10)
                print(f"\nhistory {history}:", file=out)
                print(format_results(outputs), file=out)
                answered += int(len(outputs.get("item_ids", [])) > 0)
    finally:
        server.stop(grace=1.0)
        print("server stopped", file=out)
    return answered


def run_demo(config: Optional[PipelineConfig], out: TextIO) -> RunResult:
    """Runs the pipeline of ``config`` (default: the embedded demo) and queries the result."""
    config = config or demo_config()
    start = time.monotonic()
    result = run_pipeline(config)
    elapsed = time.monotonic() - start
    hits = sum(result.cache_hits.values())
    print(
        f"pipeline {config.name}: {len(result.results)} components "
        f"({hits} cache hits) in {elapsed:.0f}s",
        file=out,
    )
    pushed = result.results["Pusher"].outputs["pushed_model"]
    versions = (
        [v for v in os.listdir(config.serving_dir)] if os.path.isdir(config.serving_dir) else []
    )
    if not pushed.properties.get("pushed"):
        print("the new model was not blessed; serving the previously pushed version", file=out)
    if versions:
        data_dir = result.results["Transform"].outputs["transformed_examples"].uri
        serve_and_query(
            config.serving_dir, config.serving.model_name, demo_histories(data_dir), out
        )
    else:
        print("no model version to serve (nothing was ever blessed)", file=out)
    return result
