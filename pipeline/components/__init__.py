"""TFX-shaped components: declared input/output artifact types and a ``run`` method.

Each component is a frozen dataclass holding exactly the configuration it
depends on: the runner hashes its fields (minus those marked ``cache=False``, such
as Beam runner options) with the fingerprints of its input artifacts into the
cache key. ``run(inputs, output_dirs)`` writes each output into its directory
(``PIPELINE_ROOT/<node>/<execution id>/<output key>``) and returns, per output,
the custom properties to record (and optionally a different ``uri``).

    ExampleGen -> StatisticsGen -> SchemaGen -> ExampleValidator
           \\-> Transform -> Trainer (one per variant) -> Evaluator -> Pusher

Modules: ``base`` (the contract), ``data`` (ExampleGen, TFDV components,
Transform), ``model`` (Trainer, Evaluator, Pusher).
"""

from pipeline.components.base import Component, Output
from pipeline.components.data import (
    EXAMPLES_HEADER,
    AnomaliesFound,
    ExampleGen,
    ExampleValidator,
    SchemaGen,
    StatisticsGen,
    Transform,
    load_statistics,
    schema_file,
    source_fingerprint,
)
from pipeline.components.model import (
    BLESSED_FILE,
    METRICS_FILE,
    NOT_BLESSED_FILE,
    Evaluator,
    Pusher,
    Trainer,
)

__all__ = [
    "BLESSED_FILE",
    "EXAMPLES_HEADER",
    "METRICS_FILE",
    "NOT_BLESSED_FILE",
    "AnomaliesFound",
    "Component",
    "Evaluator",
    "ExampleGen",
    "ExampleValidator",
    "Output",
    "Pusher",
    "SchemaGen",
    "StatisticsGen",
    "Trainer",
    "Transform",
    "load_statistics",
    "schema_file",
    "source_fingerprint",
]
