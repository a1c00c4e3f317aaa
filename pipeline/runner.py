"""The local runner: dependency order, ML Metadata records, caching and resume.

For each node in order the runner resolves its inputs (upstream outputs of this
run, external raw files, MLMD resolvers), computes the cache key (sha256 of the
component's cache config and the input fingerprints) and either reuses the
outputs of an earlier COMPLETE execution with that key (a ``CACHED`` execution,
logged as a cache hit) or runs the component into
``ROOT/<node>/<execution id>/<output>``. Resume is the cache: a run killed midway
leaves its current execution RUNNING (never matched), and starting again reuses
every finished component.

Crash safety: an execution's outputs are recorded (and so become cacheable)
only after its component returned, so a process killed at any point leaves at
most a RUNNING execution whose files are never reused; the next run gives the
node a new execution directory. Model versions appear in the serving path only
by an atomic rename, and the Pusher does not push a model again that the
latest version already holds. ``pipeline.faults`` (``DNC_FAULT_KILL_AT``) kills
the process at chosen points to test this.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import uuid
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from pipeline import faults
from pipeline.components import Component, Output
from pipeline.config import PipelineConfig
from pipeline.dag import Node, Pipeline
from pipeline.metadata import ArtifactRef, Metadata, State, connection_config, fingerprint_path

log = logging.getLogger(__name__)

CODE_VERSION = "1"  # bump to invalidate every cached execution


@dataclasses.dataclass(frozen=True)
class NodeResult:
    """One node's outcome in a run.

    Attributes:
        node: node id.
        execution_id: MLMD execution id.
        cached: True for a cache hit.
        outputs: output key -> artifact.
    """

    node: str
    execution_id: int
    cached: bool
    outputs: Mapping[str, ArtifactRef]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """A finished run.

    Attributes:
        run_id: the ``pipeline_run`` context name suffix.
        results: node id -> result, in execution order.
        report: path of the run report ('' when not written).
    """

    run_id: str
    results: Mapping[str, NodeResult]
    report: str = ""

    @property
    def cache_hits(self) -> Dict[str, bool]:
        """Node id -> whether it was a cache hit."""
        return {n: r.cached for n, r in self.results.items()}


def open_metadata(config: PipelineConfig) -> Metadata:
    """The MLMD store of ``config`` (SQLite in the pipeline root unless gRPC is set)."""
    m = config.metadata
    connection = connection_config(os.path.abspath(config.sqlite_path), m.grpc_host, m.grpc_port)
    return Metadata(connection, config.name)


def cache_key(node: Node, inputs: Mapping[str, ArtifactRef]) -> str:
    """sha256 of the node id, component class, cache config and input fingerprints."""
    payload = {
        "code": CODE_VERSION,
        "node": node.id,
        "component": type(node.component).__name__,
        "config": node.component.cache_config(),
        "inputs": {k: a.fingerprint for k, a in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class LocalRunner:
    """Runs a pipeline in this process.

    Args:
        config: the pipeline config (for the MLMD connection).
        metadata: an open store (default: ``open_metadata(config)``).
    """

    def __init__(self, config: PipelineConfig, metadata: Optional[Metadata] = None) -> None:
        self.config = config
        self.metadata = metadata or open_metadata(config)

    def run(
        self,
        pipeline: Pipeline,
        only: Sequence[str] = (),
        run_id: Optional[str] = None,
        report: bool = True,
    ) -> RunResult:
        """Runs every node (or just ``only``, inputs taken from MLMD) in order."""
        run_id = run_id or datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        kill_at = faults.kill_target(pipeline.node_ids)
        if kill_at:
            log.warning("fault injection active: SIGKILL at %s:%s", *kill_at)
        log.info("pipeline %s run %s: %s", pipeline.name, run_id, " -> ".join(pipeline.node_ids))
        results: Dict[str, NodeResult] = {}
        for node in pipeline.nodes:
            if only and node.id not in only:
                continue
            inputs = self._inputs(node, results)
            results[node.id] = self._run_node(pipeline, node, inputs, run_id, kill_at)
        path = ""
        if report and not only:
            from pipeline.report import write_report

            path = write_report(RunResult(run_id, results), pipeline, self.metadata)
        return RunResult(run_id, results, path)

    def _inputs(self, node: Node, results: Mapping[str, NodeResult]) -> Dict[str, ArtifactRef]:
        inputs: Dict[str, ArtifactRef] = {}
        for key, ref in node.component.external_inputs().items():
            inputs[key] = self.metadata.external_artifact(ref)
        for key, (upstream, output) in node.inputs.items():
            if upstream in results:
                outputs = results[upstream].outputs
            else:
                found = self.metadata.latest_outputs(upstream)
                if found is None:
                    raise RuntimeError(f"{node.id}: upstream {upstream} has not run yet")
                outputs = found
            inputs[key] = outputs[output]
        for key, ref in node.component.resolve(self.metadata, inputs).items():
            inputs[key] = ref
        return inputs

    def _run_node(
        self,
        pipeline: Pipeline,
        node: Node,
        inputs: Dict[str, ArtifactRef],
        run_id: str,
        kill_at: Optional[Tuple[str, str]] = None,
    ) -> NodeResult:
        component = node.component
        kind = type(component).__name__
        key = cache_key(node, inputs)
        cached = self.metadata.cached_outputs(node.id, key)
        if cached is not None:
            execution_id = self.metadata.record_cached(kind, node.id, key, run_id, inputs, cached)
            log.info("%s: cache hit (execution %d, key %s)", node.id, execution_id, key[:12])
            return NodeResult(node.id, execution_id, True, cached)
        execution_id = self.metadata.start_execution(kind, node.id, key, run_id, inputs)
        log.info("%s: running (execution %d, key %s)", node.id, execution_id, key[:12])
        base = os.path.join(os.path.abspath(pipeline.root), node.id, str(execution_id))
        output_dirs = {name: os.path.join(base, name) for name in type(component).outputs}
        for d in output_dirs.values():
            os.makedirs(os.path.dirname(d), exist_ok=True)
        faults.checkpoint(kill_at, node.id, "before_run")
        try:
            with faults.watch_writes(kill_at, node.id, [base, *component.write_locations()]):
                produced = component.run(inputs, output_dirs)
        except Exception:
            self.metadata.finish_execution(execution_id, State.FAILED)
            log.error("%s: FAILED (execution %d)", node.id, execution_id)
            raise
        except BaseException:
            self.metadata.finish_execution(execution_id, State.CANCELED)
            raise
        faults.checkpoint(kill_at, node.id, "after_run")
        outputs = self._output_refs(component, produced, output_dirs)
        recorded = self.metadata.finish_execution(execution_id, State.COMPLETE, outputs)
        log.info("%s: complete (execution %d)", node.id, execution_id)
        return NodeResult(node.id, execution_id, False, recorded)

    @staticmethod
    def _output_refs(
        component: Component, produced: Mapping[str, Output], output_dirs: Mapping[str, str]
    ) -> Dict[str, ArtifactRef]:
        refs = {}
        for name, type_name in type(component).outputs.items():
            out = produced.get(name, Output())
            uri = out.uri or output_dirs[name]
            os.makedirs(uri, exist_ok=True)
            refs[name] = ArtifactRef(type_name, uri, fingerprint_path(uri), dict(out.properties))
        return refs


def run_pipeline(config: PipelineConfig, only: Sequence[str] = (), **kwargs: Any) -> RunResult:
    """``create_pipeline(config)`` run by the :class:`LocalRunner`."""
    from pipeline.dag import create_pipeline

    return LocalRunner(config).run(create_pipeline(config), only=only, **kwargs)
