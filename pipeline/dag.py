"""The pipeline as data: nodes (component instances) wired by artifact channels.

``create_pipeline(config)`` is pure: it builds the graph and touches nothing.
Runners (``pipeline.runner`` locally, ``pipeline.kfp_compile`` for Kubeflow) decide
where it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Tuple

from pipeline.components import (
    Component,
    Evaluator,
    ExampleGen,
    ExampleValidator,
    Pusher,
    SchemaGen,
    StatisticsGen,
    Trainer,
    Transform,
)
from pipeline.config import PipelineConfig


@dataclasses.dataclass(frozen=True)
class Node:
    """One component in the graph.

    Attributes:
        id: unique node id (``Trainer.dnc``); names its MLMD executions and folders.
        component: the configured component.
        inputs: input key -> (upstream node id, output key).
    """

    id: str
    component: Component
    inputs: Mapping[str, Tuple[str, str]] = dataclasses.field(default_factory=dict)

    @property
    def upstream(self) -> List[str]:
        """Ids of the nodes this one consumes from, sorted."""
        return sorted({node for node, _ in self.inputs.values()})


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Nodes in a valid execution (topological) order.

    Attributes:
        name: pipeline name.
        root: pipeline root directory.
        nodes: the nodes, each after everything it consumes.
    """

    name: str
    root: str
    nodes: Tuple[Node, ...]

    def __post_init__(self) -> None:
        seen: Dict[str, Node] = {}
        for node in self.nodes:
            if node.id in seen:
                raise ValueError(f"duplicate node id {node.id!r}")
            for key, (up, output) in node.inputs.items():
                if up not in seen:
                    raise ValueError(f"node {node.id!r} input {key!r}: {up!r} is not upstream")
                if output not in type(seen[up].component).outputs:
                    raise ValueError(f"node {node.id!r} input {key!r}: {up!r} has no {output!r}")
            seen[node.id] = node

    def node(self, node_id: str) -> Node:
        """The node with ``node_id``."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise ValueError(f"unknown component {node_id!r}; expected one of {self.node_ids}")

    @property
    def node_ids(self) -> Tuple[str, ...]:
        """Node ids in execution order."""
        return tuple(n.id for n in self.nodes)


def create_pipeline(config: PipelineConfig) -> Pipeline:
    """The TFX-style pipeline of ``config`` (pure: no I/O)."""
    beam = config.beam.args()
    variants = config.trainer.variants
    nodes = [
        Node("ExampleGen", ExampleGen(config.example_gen, beam)),
        Node("StatisticsGen", StatisticsGen(beam), {"examples": ("ExampleGen", "examples")}),
        Node("SchemaGen", SchemaGen(), {"statistics": ("StatisticsGen", "statistics")}),
        Node(
            "ExampleValidator",
            ExampleValidator(config.validation.on_anomalies),
            {
                "statistics": ("StatisticsGen", "statistics"),
                "schema": ("SchemaGen", "schema"),
            },
        ),
        Node(
            "Transform",
            Transform(config.transform, beam),
            # The anomalies input orders Transform after validation (a failing
            # validation stops the run before any preprocessing).
            {
                "examples": ("ExampleGen", "examples"),
                "anomalies": ("ExampleValidator", "anomalies"),
            },
        ),
    ]
    data = {"transformed_examples": ("Transform", "transformed_examples")}
    for variant in variants:
        nodes.append(Node(f"Trainer.{variant}", Trainer(variant, config.trainer), dict(data)))
    nodes.append(
        Node(
            "Evaluator",
            Evaluator(config.serving.variant, variants, config.evaluator, config.serving.index),
            {**data, **{f"model_{v}": (f"Trainer.{v}", "model") for v in variants}},
        )
    )
    # The Pusher takes every model it may push: serving.variant's, or with "best" every
    # servable one; the blessing says which one the Evaluator chose.
    models = {f"model_{v}": (f"Trainer.{v}", "model") for v in config.push_candidates}
    nodes.append(
        Node(
            "Pusher",
            Pusher(
                config.serving,
                config.serving_dir,
                alpha=config.evaluator.alpha,
                merge=config.evaluator.merge,
            ),
            {**data, **models, "blessing": ("Evaluator", "blessing")},
        )
    )
    return Pipeline(config.name, config.root, tuple(nodes))
