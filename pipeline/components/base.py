"""The component contract: ``Component`` (declared artifacts, cache config, ``run``)
and ``Output`` (what ``run`` reports per output)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from pipeline.config import to_dict
from pipeline.metadata import ArtifactRef, Metadata


@dataclasses.dataclass(frozen=True)
class Output:
    """What ``Component.run`` reports for one output.

    Attributes:
        properties: custom properties recorded on the artifact.
        uri: the artifact's location when it is not the given output directory.
    """

    properties: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    uri: Optional[str] = None


class Component:
    """Base of every component (subclasses are frozen dataclasses).

    Attributes:
        inputs: input key -> artifact type.
        outputs: output key -> artifact type.
    """

    inputs: ClassVar[Dict[str, str]] = {}
    outputs: ClassVar[Dict[str, str]] = {}

    def cache_config(self) -> Dict[str, Any]:
        """The fields that enter the cache key."""
        return {
            f.name: to_dict(v) if dataclasses.is_dataclass(v) else plain(v)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.metadata.get("cache", True)
            for v in [getattr(self, f.name)]
        }

    def external_inputs(self) -> Dict[str, ArtifactRef]:
        """Inputs made outside the pipeline (raw files), keyed like ``inputs``."""
        return {}

    def write_locations(self) -> Tuple[str, ...]:
        """Paths outside its execution directory that ``run`` writes (Pusher: the serving path)."""
        return ()

    def resolve(self, metadata: Metadata, inputs: Mapping[str, ArtifactRef]) -> Dict[str, Any]:
        """Extra inputs looked up in MLMD (TFX resolvers), keyed by input name."""
        return {}

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        """Produces the outputs; returns output key -> ``Output``."""
        raise NotImplementedError


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def nocache(default: Any = ()) -> Any:
    return dataclasses.field(default=default, metadata={"cache": False})
