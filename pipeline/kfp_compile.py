"""Compiles the pipeline to a Kubeflow Pipelines v2 spec (kfp SDK).

One container step per component, all from the project image: each runs
``dnc pipeline run --config CONFIG --component NODE``, which executes that node
with the local runner against the shared MLMD store (``metadata.grpc_host`` on a
cluster) and takes its inputs from the upstream nodes' latest executions. Step
order follows the artifact dependencies of ``create_pipeline``.
"""

from __future__ import annotations

import re
from typing import Any, Dict

from pipeline.config import PipelineConfig
from pipeline.dag import create_pipeline


def step_name(node_id: str) -> str:
    """The KFP component/task name of a node (``Trainer.dnc`` -> ``trainer-dnc``)."""
    return re.sub(r"[^a-z0-9]+", "-", node_id.lower()).strip("-")


def _container_op(node_id: str, image: str, config_path: str) -> Any:
    from kfp import dsl

    def op():  # no annotation: kfp rejects the string form
        return dsl.ContainerSpec(
            image=image,
            command=["dnc"],
            args=["pipeline", "run", "--config", config_path, "--component", node_id],
        )

    op.__name__ = step_name(node_id).replace("-", "_")
    return dsl.container_component(op)


def compile_kfp(config: PipelineConfig, package_path: str) -> Dict[str, Any]:
    """Writes the KFP v2 pipeline spec of ``config`` to ``package_path`` (YAML).

    Returns:
        Step name -> names of the steps it runs after.
    """
    from kfp import compiler, dsl

    pipeline = create_pipeline(config)
    ops = {
        n.id: _container_op(n.id, config.kfp.image, config.kfp.config_path) for n in pipeline.nodes
    }
    order: Dict[str, Any] = {}

    @dsl.pipeline(name=step_name(config.name), description="dnc TFX-style pipeline")
    def kfp_pipeline():  # kfp reads annotations; none here
        tasks: Dict[str, Any] = {}
        for node in pipeline.nodes:
            task = ops[node.id]()
            task.set_display_name(node.id)
            for upstream in node.upstream:
                task.after(tasks[upstream])
            tasks[node.id] = task
            order[step_name(node.id)] = [step_name(u) for u in node.upstream]

    compiler.Compiler().compile(kfp_pipeline, package_path=package_path)
    return order
