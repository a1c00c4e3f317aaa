"""Typed configuration of the TFX-style pipeline, loaded from one YAML or TOML file.

Every field has a default and a description (``field(metadata={"help": ...})`` on
this module's sections; the ``Attributes:`` docstring section for the reused
preprocessing/trainer dataclasses). Unknown keys raise ``ValueError`` naming the
dotted key. The ``trainer`` section is generated from ``trainer.knobs``: one key per
``TrainConfig`` field (``model``: the ``ModelConfig`` fields), null meaning the
variant's regime (``trainer.config.make_train_config``). ``PipelineConfig()`` has small
synthetic data and trains ``dnc`` and ``sasrec`` in their regimes; :func:`demo_config`
(the embedded demo) sets a small model and two epochs on top.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, Union

from preprocessing.config import (
    FILTER_MODES,
    SOURCES,
    ClusteringConfig,
    SyntheticConfig,
)
from serving.index_kinds import INDEX_KINDS
from trainer import knobs
from trainer.config import PRESETS, VARIANTS, ModelConfig, TrainConfig

ANOMALY_POLICIES = ("warn", "fail")
BEST = "best"  # serving.variant: the servable variant with the best validation recall

# The embedded demo's training settings (``dnc pipeline run`` without --config): a small,
# fast model, set explicitly here as a config file would; every other knob takes the
# variants' regimes, like any config file's unset knobs.
DEMO_TRAINER: Mapping[str, Any] = {
    "epochs": 2,
    "eval_users": 500,
    "model": {"embedding_dim": 32, "max_len": 50, "num_blocks": 1},
}


def servable(variant: str) -> bool:
    """Whether ``variant`` can be exported for serving (``mf`` needs user indices)."""
    return VARIANTS[variant].user_tower != "mf"


def _f(default: Any, help: str, factory: bool = False) -> Any:  # noqa: A002
    if factory:
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class BeamSection:
    """Options of the Beam-backed components (ExampleGen, StatisticsGen, Transform)."""

    runner: str = _f("DirectRunner", "Beam runner: DirectRunner, DataflowRunner, FlinkRunner...")
    options: Tuple[str, ...] = _f((), "further Beam pipeline options, e.g. --project=p")

    def args(self) -> Tuple[str, ...]:
        """Pipeline arguments for ``PipelineOptions``."""
        return (f"--runner={self.runner}", *self.options)


@dataclasses.dataclass(frozen=True)
class MetadataSection:
    """Where ML Metadata lives."""

    sqlite: str = _f("", "SQLite file of the MLMD store ('' = ROOT/metadata.sqlite)")
    grpc_host: str = _f("", "MLMD gRPC service host (cluster runs); overrides sqlite when set")
    grpc_port: int = _f(8080, "MLMD gRPC service port")


@dataclasses.dataclass(frozen=True)
class ExampleGenSection:
    """Raw data source read and validated by ExampleGen."""

    source: str = _f("synthetic", f"source kind, one of {SOURCES}")
    input: str = _f("", "file, directory or glob of raw data (unused by synthetic)")
    min_rating: Optional[float] = _f(None, "ml1m: keep ratings >= this (null keeps all)")
    kuairand_tab: Optional[int] = _f(1, "KuaiRand: tab to keep (null keeps all)")
    kuairand_require_click: bool = _f(True, "KuaiRand: keep only clicked rows")
    synthetic: SyntheticConfig = _f(
        lambda: SyntheticConfig(num_users=1000, num_items=500, num_categories=8),
        "embedded synthetic generator settings",
        factory=True,
    )

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"example_gen.source {self.source!r} is not one of {SOURCES}")
        if self.source != "synthetic" and not self.input:
            raise ValueError(f"example_gen.input is required for source {self.source!r}")


@dataclasses.dataclass(frozen=True)
class ValidationSection:
    """ExampleValidator policy."""

    on_anomalies: str = _f("warn", f"what anomalies do to the run, one of {ANOMALY_POLICIES}")

    def __post_init__(self) -> None:
        if self.on_anomalies not in ANOMALY_POLICIES:
            raise ValueError(
                f"validation.on_anomalies {self.on_anomalies!r} is not one of {ANOMALY_POLICIES}"
            )


@dataclasses.dataclass(frozen=True)
class TransformSection:
    """Transform (Beam + TFT preprocessing) settings."""

    clustering: ClusteringConfig = _f(
        lambda: ClusteringConfig(num_clusters=8), "item clustering", factory=True
    )
    min_item_interactions: int = _f(1, "drop items with fewer interactions")
    min_user_interactions: int = _f(1, "drop users with fewer interactions")
    filter_mode: str = _f("until_stable", f"min-count filter mode, one of {FILTER_MODES}")
    max_filter_rounds: int = _f(20, "bound on until_stable filter rounds")
    dedup_consecutive: bool = _f(False, "collapse consecutive repeats of the same item")
    num_shards: int = _f(1, "TFRecord shards per split (0 lets the runner decide)")


def _knob_fields(model: bool) -> List[Tuple[str, Any, Any]]:
    """One ``Optional`` field per knob of ``trainer.knobs`` (None: the regime's value)."""
    hints = {**typing.get_type_hints(TrainConfig), **typing.get_type_hints(ModelConfig)}
    out = []
    for k in knobs.knobs():
        if k.model != model:
            continue
        tp = Optional[hints[k.name]]
        if k.optional:  # also the explicit None, knobs.NONE
            tp = Optional[Union[hints[k.name], str]]
        extra = f"; {knobs.NONE!r}: None" if k.optional else ""
        help_text = f"{k.help} (null: the variant's regime{extra})"
        metadata = {"help": help_text, "convert": k.convert}
        out.append((k.name, tp, dataclasses.field(default=None, metadata=metadata)))
    return out


ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    _knob_fields(model=True),
    frozen=True,
    namespace={
        "__doc__": "``trainer.model``: the ModelConfig knobs (null: the variant's regime).",
        "__module__": __name__,
    },
)


class _TrainerMethods:
    """Trainer settings: the variants to train, the preset and every training knob.

    The knobs are generated from ``trainer.knobs`` (one key per ``TrainConfig`` field,
    ``model`` a mapping of ``ModelConfig`` fields); a knob left null takes the value of
    each variant's regime under ``preset`` (``trainer.config.make_train_config``), as
    an unset ``dnc train`` flag does.
    """

    variants: Tuple[str, ...]
    preset: str
    model: Any

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("trainer.variants is empty")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"trainer.variants: unknown variant {v!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"trainer.preset {self.preset!r} is not one of {PRESETS}")
        for v in self.variants:  # every knob checked now, not when the Trainer runs
            self.train_config(v, "", "")

    def knob_values(self) -> Dict[str, Any]:
        """Knob name -> value (None: not set), ``ModelConfig`` knobs included."""
        return {k.name: getattr(self.model if k.model else self, k.name) for k in knobs.knobs()}

    def train_config(self, variant: str, data: str, output: str) -> TrainConfig:
        """The ``TrainConfig`` of ``variant``: its regime under ``preset`` + the set knobs."""
        return knobs.build_config(data, output, variant, self.preset, self.knob_values())


TrainerSection = dataclasses.make_dataclass(
    "TrainerSection",
    [
        ("variants", Tuple[str, ...], _f(("dnc", "sasrec"), "variants to train, one Trainer each")),
        ("preset", str, _f("default", f"regime of the unset knobs, one of {PRESETS}")),
        ("model", ModelSection, _f(ModelSection, "architecture (ModelConfig knobs)", True)),
        *_knob_fields(model=False),
    ],
    bases=(_TrainerMethods,),
    frozen=True,
    namespace={"__doc__": _TrainerMethods.__doc__, "__module__": __name__},
)


@dataclasses.dataclass(frozen=True)
class EvaluatorSection:
    """Evaluator and blessing settings."""

    m: int = _f(50, "the M of Recall@M used for blessing")
    tolerance: float = _f(0.01, "largest allowed absolute Recall@M drop vs the pushed model")
    alpha: Optional[float] = _f(None, "quota exponent (null: selected on validation)")
    merge: Optional[str] = _f(
        None, "per-cluster merge, quota or score (null: selected on validation with alpha)"
    )

    def __post_init__(self) -> None:
        if self.m < 1 or self.tolerance < 0:
            raise ValueError(f"evaluator.m must be >= 1 and tolerance >= 0, got {self}")
        if self.merge is not None:
            from trainer.score_merge import check_merge

            try:
                check_merge(self.merge)
            except ValueError as e:
                raise ValueError(f"evaluator.merge: {e}") from e


@dataclasses.dataclass(frozen=True)
class ServingSection:
    """Pusher target and the served variant."""

    variant: str = _f(
        BEST,
        f"the trained variant that is blessed and pushed; {BEST!r}: the servable one (not mf) "
        "with the best validation Recall@M",
    )
    base_path: str = _f("", "serving base path ('' = ROOT/serving)")
    model_name: str = _f("dnc", "served model name; versions go to BASE_PATH/MODEL_NAME/N")
    index: str = _f("scann", f"index kind, one of {INDEX_KINDS}")

    def __post_init__(self) -> None:
        if self.variant != BEST and self.variant not in VARIANTS:
            raise ValueError(
                f"serving.variant {self.variant!r} is neither {BEST!r} nor one of {tuple(VARIANTS)}"
            )
        if self.index not in INDEX_KINDS:
            raise ValueError(f"serving.index {self.index!r} is not one of {INDEX_KINDS}")


@dataclasses.dataclass(frozen=True)
class KfpSection:
    """Kubeflow Pipelines compilation."""

    image: str = _f("dnc:latest", "container image of every step (the project Dockerfile)")
    config_path: str = _f("/config/pipeline.yaml", "config file path inside the container")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline configuration (top-level keys of the config file)."""

    name: str = _f("dnc", "pipeline name (the MLMD pipeline context)")
    root: str = _f("runs/pipeline", "pipeline root: artifacts, MLMD store, reports")
    beam: BeamSection = _f(BeamSection, "Beam runner options", factory=True)
    metadata: MetadataSection = _f(MetadataSection, "ML Metadata store", factory=True)
    example_gen: ExampleGenSection = _f(ExampleGenSection, "raw data source", factory=True)
    validation: ValidationSection = _f(ValidationSection, "anomaly policy", factory=True)
    transform: TransformSection = _f(TransformSection, "preprocessing", factory=True)
    trainer: TrainerSection = _f(TrainerSection, "training", factory=True)
    evaluator: EvaluatorSection = _f(EvaluatorSection, "evaluation and blessing", factory=True)
    serving: ServingSection = _f(ServingSection, "pusher target", factory=True)
    kfp: KfpSection = _f(KfpSection, "Kubeflow Pipelines compilation", factory=True)

    def __post_init__(self) -> None:
        if not self.servable_variants:
            raise ValueError(
                f"none of trainer.variants {self.trainer.variants} can be served "
                "(mf scores by user index)"
            )
        if self.serving.variant == BEST:
            return
        if self.serving.variant not in self.trainer.variants:
            raise ValueError(
                f"serving.variant {self.serving.variant!r} is not in trainer.variants "
                f"{self.trainer.variants}"
            )
        if self.serving.variant not in self.servable_variants:
            raise ValueError(f"serving.variant {self.serving.variant!r} cannot be served")

    @property
    def servable_variants(self) -> Tuple[str, ...]:
        """The trained variants that can be exported (all but ``mf``), in config order."""
        return tuple(v for v in self.trainer.variants if servable(v))

    @property
    def push_candidates(self) -> Tuple[str, ...]:
        """The variants the Pusher may push: ``serving.variant``, or every servable one."""
        if self.serving.variant == BEST:
            return self.servable_variants
        return (self.serving.variant,)

    @property
    def serving_dir(self) -> str:
        """``BASE_PATH/MODEL_NAME``: where the Pusher writes versions."""
        base = self.serving.base_path or os.path.join(self.root, "serving")
        return os.path.join(base, self.serving.model_name)

    @property
    def sqlite_path(self) -> str:
        """The MLMD SQLite file."""
        return self.metadata.sqlite or os.path.join(self.root, "metadata.sqlite")


# --------------------------------------------------------------------------- loading


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(tp: Any, value: Any, key: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a table/mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.", default=default)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp is float and value in ("inf", "infinity"):
        return float("inf")
    raise ValueError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: Type[Any], raw: Mapping[str, Any], prefix: str = "", default: Any = None) -> Any:
    """Builds dataclass ``cls`` from a mapping; missing keys keep their defaults.

    Args:
        cls: the dataclass.
        raw: the mapping (one level of the config file).
        prefix: dotted path of this level, for error messages.
        default: the instance whose values missing keys keep (``cls()`` if None).

    Raises:
        ValueError: an unknown key (named with its dotted path) or a wrongly typed value.
    """
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(
            f"unknown config key '{prefix}{unknown[0]}'"
            f"{' (and ' + ', '.join(prefix + u for u in unknown[1:]) + ')' if unknown[1:] else ''}"
            f"; known keys: {', '.join(sorted(names))}"
        )
    defaults = cls() if default is None else default
    converters = {f.name: f.metadata.get("convert") for f in dataclasses.fields(cls)}
    kwargs = {
        k: converters[k](v, f"{prefix}{k}")
        if converters[k]
        else _convert(hints[k], v, f"{prefix}{k}", getattr(defaults, k))
        for k, v in raw.items()
    }
    try:
        return dataclasses.replace(defaults, **kwargs)
    except ValueError as e:
        raise ValueError(f"{prefix or 'config'}: {e}") from e


def load_config(path: Optional[str]) -> PipelineConfig:
    """Loads a ``.yaml``/``.yml`` or ``.toml`` file; None gives the embedded demo config."""
    if path is None:
        return demo_config()
    with open(path, "rb") as f:
        content = f.read()
    if path.endswith(".toml"):
        raw = tomllib.loads(content.decode("utf-8"))
    elif path.endswith((".yaml", ".yml")):
        import yaml

        raw = yaml.safe_load(content) or {}
    else:
        raise ValueError(f"config {path}: expected a .yaml, .yml or .toml file")
    if not isinstance(raw, Mapping):
        raise ValueError(f"config {path}: top level must be a mapping")
    return from_dict(PipelineConfig, raw)


def demo_config() -> PipelineConfig:
    """The embedded demo: ``PipelineConfig()`` (small synthetic data, ``dnc`` and
    ``sasrec``) with the small, fast model of :data:`DEMO_TRAINER`."""
    return from_dict(PipelineConfig, {"trainer": DEMO_TRAINER})


def to_dict(config: Any) -> Dict[str, Any]:
    """The config as plain data (tuples as lists), e.g. for hashing or YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


# --------------------------------------------------------------------------- descriptions


def field_help(cls: type, name: str) -> str:
    """The description of field ``name`` of dataclass ``cls`` ('' if none)."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.metadata.get("help"):
            return str(f.metadata["help"])
    return knobs.docstring_attributes(cls).get(name, "")


def describe(config: Any = None, prefix: str = "") -> Dict[str, Tuple[Any, str]]:
    """Every leaf key (dotted) -> (default value, description) of ``config``'s tree."""
    value = PipelineConfig() if config is None else config
    out: Dict[str, Tuple[Any, str]] = {}
    hints = _hints(type(value))
    for f in dataclasses.fields(value):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(describe(getattr(value, f.name), f"{key}."))
        else:
            out[key] = (getattr(value, f.name), field_help(type(value), f.name))
    return out
