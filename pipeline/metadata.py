"""ML Metadata bookkeeping: artifacts, executions, events, contexts and cache lookup.

Every component execution is one MLMD ``Execution`` (type = the component class,
custom properties ``node``, ``cache_key``, ``run_id``) associated with the
``pipeline`` context and one ``pipeline_run`` context. Its inputs and outputs are
``Artifact`` rows (type = the artifact type, custom property ``fingerprint``, the
content hash of the artifact) linked by ``INPUT``/``OUTPUT`` events whose path is
the input/output key. A cache hit is recorded as a ``CACHED`` execution whose
output events point at the reused artifacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2 as mlmd

PIPELINE_CONTEXT = "pipeline"
RUN_CONTEXT = "pipeline_run"
EXTERNAL = "ExternalArtifact"
State = mlmd.Execution.State


@dataclasses.dataclass(frozen=True)
class ArtifactRef:
    """An artifact as the runner and the components see it.

    Attributes:
        type_name: MLMD artifact type (Examples, Model, ...).
        uri: where its content lives.
        fingerprint: content hash (sha256) of ``uri``.
        properties: further custom properties (str, int or float values).
        id: MLMD artifact id (0 before it is recorded).
    """

    type_name: str
    uri: str
    fingerprint: str
    properties: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    id: int = 0


def fingerprint_path(path: str) -> str:
    """sha256 over the relative paths and bytes of a file or directory tree."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        files = [("", path)]
    else:
        files = []
        for parent, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(parent, name)
                files.append((os.path.relpath(full, path), full))
    for rel, full in files:
        digest.update(rel.encode() + b"\0")
        with open(full, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _set(props: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        props[key].int_value = int(value)
    elif isinstance(value, int):
        props[key].int_value = value
    elif isinstance(value, float):
        props[key].double_value = value
    else:
        props[key].string_value = str(value)


def _get(props: Any, key: str, default: Any = None) -> Any:
    if key not in props:
        return default
    value = props[key]
    return getattr(value, value.WhichOneof("value"))


def _props(props: Any) -> Dict[str, Any]:
    return {k: _get(props, k) for k in props}


def connection_config(sqlite_path: str = "", grpc_host: str = "", grpc_port: int = 8080) -> Any:
    """A SQLite ``ConnectionConfig`` or, with ``grpc_host``, a gRPC client config."""
    if grpc_host:
        config = mlmd.MetadataStoreClientConfig(host=grpc_host, port=grpc_port)
        return config
    os.makedirs(os.path.dirname(os.path.abspath(sqlite_path)), exist_ok=True)
    config = mlmd.ConnectionConfig()
    config.sqlite.filename_uri = sqlite_path
    config.sqlite.connection_mode = mlmd.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return config


class Metadata:
    """The project's view of an MLMD store for one pipeline.

    Args:
        config: ``ConnectionConfig`` or ``MetadataStoreClientConfig``.
        pipeline_name: name of the pipeline context.
    """

    def __init__(self, config: Any, pipeline_name: str) -> None:
        self.store = metadata_store.MetadataStore(config)
        self.pipeline_name = pipeline_name
        self._types: Dict[Tuple[str, str], int] = {}
        self.pipeline_context = self._context(PIPELINE_CONTEXT, pipeline_name)

    # ------------------------------------------------------------------ types, contexts

    def _type_id(self, kind: str, name: str) -> int:
        key = (kind, name)
        if key not in self._types:
            if kind == "artifact":
                tid = self.store.put_artifact_type(mlmd.ArtifactType(name=name))
            elif kind == "execution":
                tid = self.store.put_execution_type(mlmd.ExecutionType(name=name))
            else:
                tid = self.store.put_context_type(mlmd.ContextType(name=name))
            self._types[key] = tid
        return self._types[key]

    def _context(self, type_name: str, name: str) -> mlmd.Context:
        existing = self.store.get_context_by_type_and_name(type_name, name)
        if existing is not None:
            return existing
        context = mlmd.Context(type_id=self._type_id("context", type_name), name=name)
        [context.id] = self.store.put_contexts([context])
        return context

    def run_context(self, run_id: str) -> mlmd.Context:
        """The ``pipeline_run`` context of ``run_id`` (created on first use)."""
        return self._context(RUN_CONTEXT, f"{self.pipeline_name}.{run_id}")

    # ------------------------------------------------------------------ artifacts

    def _artifact_proto(self, ref: ArtifactRef) -> mlmd.Artifact:
        artifact = mlmd.Artifact(
            type_id=self._type_id("artifact", ref.type_name), uri=ref.uri, state=mlmd.Artifact.LIVE
        )
        if ref.id:
            artifact.id = ref.id
        _set(artifact.custom_properties, "fingerprint", ref.fingerprint)
        for key, value in ref.properties.items():
            _set(artifact.custom_properties, key, value)
        return artifact

    def _ref(self, artifact: mlmd.Artifact, type_name: Optional[str] = None) -> ArtifactRef:
        if type_name is None:
            [t] = self.store.get_artifact_types_by_id([artifact.type_id])
            type_name = t.name
        props = _props(artifact.custom_properties)
        return ArtifactRef(
            type_name=type_name,
            uri=artifact.uri,
            fingerprint=props.pop("fingerprint", ""),
            properties=props,
            id=artifact.id,
        )

    def external_artifact(self, ref: ArtifactRef) -> ArtifactRef:
        """Registers (or finds by uri + fingerprint) an artifact made outside the pipeline."""
        # ML Metadata answers [] for a type never registered; any error is a real one.
        for artifact in self.store.get_artifacts_by_type(ref.type_name):
            if artifact.uri == ref.uri and (
                _get(artifact.custom_properties, "fingerprint") == ref.fingerprint
            ):
                return self._ref(artifact, ref.type_name)
        [artifact_id] = self.store.put_artifacts([self._artifact_proto(ref)])
        return dataclasses.replace(ref, id=artifact_id)

    def artifacts_by_type(self, type_name: str) -> List[ArtifactRef]:
        """Every artifact of a type, oldest first."""
        found = self.store.get_artifacts_by_type(type_name)  # [] for an unknown type
        return sorted((self._ref(a, type_name) for a in found), key=lambda r: r.id)

    def artifact(self, artifact_id: int) -> ArtifactRef:
        """One artifact by id."""
        [artifact] = self.store.get_artifacts_by_id([artifact_id])
        return self._ref(artifact)

    # ------------------------------------------------------------------ executions

    def _events(
        self, refs: Mapping[str, ArtifactRef], kind: int
    ) -> List[Tuple[mlmd.Artifact, mlmd.Event]]:
        pairs, seen = [], set()
        for key, ref in sorted(refs.items()):
            # MLMD keeps one event per (artifact, execution, type): an artifact bound
            # to two keys (a resolver returning an upstream input) is recorded once.
            if ref.id and ref.id in seen:
                continue
            seen.add(ref.id)
            event = mlmd.Event(type=kind)
            event.path.steps.add().key = key
            pairs.append((self._artifact_proto(ref), event))
        return pairs

    def _new_execution(
        self, component: str, state: int, node: str, cache_key: str, run_id: str
    ) -> Any:
        """An unsaved execution of ``component`` in ``state`` with its identifying properties."""
        execution = mlmd.Execution(
            type_id=self._type_id("execution", component), last_known_state=state
        )
        for key, value in (("node", node), ("cache_key", cache_key), ("run_id", run_id)):
            _set(execution.custom_properties, key, value)
        return execution

    def start_execution(
        self,
        component: str,
        node: str,
        cache_key: str,
        run_id: str,
        inputs: Mapping[str, ArtifactRef],
    ) -> int:
        """Records a RUNNING execution with its INPUT events; returns its id."""
        execution = self._new_execution(component, State.RUNNING, node, cache_key, run_id)
        execution_id, _, _ = self.store.put_execution(
            execution,
            self._events(inputs, mlmd.Event.INPUT),
            [self.pipeline_context, self.run_context(run_id)],
            reuse_context_if_already_exist=True,
        )
        return execution_id

    def finish_execution(
        self,
        execution_id: int,
        state: int,
        outputs: Mapping[str, ArtifactRef] = (),
        properties: Optional[Mapping[str, Any]] = None,
    ) -> Dict[str, ArtifactRef]:
        """Sets the final state and records the OUTPUT artifacts; returns them with ids."""
        [execution] = self.store.get_executions_by_id([execution_id])
        execution.last_known_state = state
        for key, value in (properties or {}).items():
            _set(execution.custom_properties, key, value)
        outputs = dict(outputs or {})
        _, artifact_ids, _ = self.store.put_execution(
            execution, self._events(outputs, mlmd.Event.OUTPUT), []
        )
        keys = sorted(outputs)
        return {
            k: dataclasses.replace(outputs[k], id=i)
            for k, i in zip(keys, artifact_ids, strict=True)
        }

    def record_cached(
        self,
        component: str,
        node: str,
        cache_key: str,
        run_id: str,
        inputs: Mapping[str, ArtifactRef],
        outputs: Mapping[str, ArtifactRef],
    ) -> int:
        """Records a CACHED execution reusing ``outputs``; returns its id."""
        execution = self._new_execution(component, State.CACHED, node, cache_key, run_id)
        pairs = self._events(inputs, mlmd.Event.INPUT) + self._events(outputs, mlmd.Event.OUTPUT)
        execution_id, _, _ = self.store.put_execution(
            execution,
            pairs,
            [self.pipeline_context, self.run_context(run_id)],
            reuse_context_if_already_exist=True,
        )
        return execution_id

    def _node_executions(self, node: str) -> List[mlmd.Execution]:
        executions = self.store.get_executions_by_context(self.pipeline_context.id)
        return sorted(
            (e for e in executions if _get(e.custom_properties, "node") == node),
            key=lambda e: e.id,
        )

    def outputs_of(self, execution_id: int) -> Dict[str, ArtifactRef]:
        """Output key -> artifact of an execution."""
        return self._linked(execution_id, mlmd.Event.OUTPUT)

    def inputs_of(self, execution_id: int) -> Dict[str, ArtifactRef]:
        """Input key -> artifact of an execution."""
        return self._linked(execution_id, mlmd.Event.INPUT)

    def _linked(self, execution_id: int, kind: int) -> Dict[str, ArtifactRef]:
        events = [
            e for e in self.store.get_events_by_execution_ids([execution_id]) if e.type == kind
        ]
        if not events:
            return {}
        artifacts = {
            a.id: a for a in self.store.get_artifacts_by_id([e.artifact_id for e in events])
        }
        return {e.path.steps[0].key: self._ref(artifacts[e.artifact_id]) for e in events}

    def cached_outputs(self, node: str, cache_key: str) -> Optional[Dict[str, ArtifactRef]]:
        """Outputs of the latest COMPLETE execution of ``node`` with ``cache_key``.

        None when there is none or one of its output artifacts vanished from disk.
        Executions left RUNNING by a killed run, FAILED or CANCELED never match.
        """
        for execution in reversed(self._node_executions(node)):
            if execution.last_known_state != State.COMPLETE:
                continue
            if _get(execution.custom_properties, "cache_key") != cache_key:
                continue
            outputs = self.outputs_of(execution.id)
            if outputs and all(os.path.exists(a.uri) for a in outputs.values()):
                return outputs
        return None

    def latest_outputs(self, node: str) -> Optional[Dict[str, ArtifactRef]]:
        """Outputs of the latest COMPLETE or CACHED execution of ``node`` (KFP steps)."""
        for execution in reversed(self._node_executions(node)):
            if execution.last_known_state in (State.COMPLETE, State.CACHED):
                return self.outputs_of(execution.id)
        return None

    def executions(self, run_id: Optional[str] = None) -> List[Dict[str, Any]]:
        """Executions of the pipeline (or of one run) as dicts: id, type, node, state."""
        if run_id is None:
            found = self.store.get_executions_by_context(self.pipeline_context.id)
        else:
            found = self.store.get_executions_by_context(self.run_context(run_id).id)
        types = {t.id: t.name for t in self.store.get_execution_types()}
        return [
            {
                "id": e.id,
                "type": types[e.type_id],
                "state": State.Name(e.last_known_state),
                **_props(e.custom_properties),
            }
            for e in sorted(found, key=lambda e: e.id)
        ]

    def lineage(self, artifact_id: int) -> List[ArtifactRef]:
        """Every artifact ``artifact_id`` was derived from (transitively), itself first."""
        seen: Dict[int, ArtifactRef] = {}
        frontier: Iterable[int] = [artifact_id]
        while frontier:
            new = [a for a in frontier if a not in seen]
            for a in new:
                seen[a] = self.artifact(a)
            producing = {
                e.execution_id
                for e in self.store.get_events_by_artifact_ids(new)
                if e.type == mlmd.Event.OUTPUT
            }
            frontier = [
                e.artifact_id
                for e in self.store.get_events_by_execution_ids(sorted(producing))
                if e.type == mlmd.Event.INPUT and e.artifact_id not in seen
            ]
        return list(seen.values())
