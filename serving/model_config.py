"""Served-model configuration: names, version policies, the model config file, versions.

Everything here is validated before the server touches the filesystem: model names and
version labels are plain identifiers (never paths), and only canonical non-negative integer
directory names are versions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import List, Mapping, Optional, Sequence, Tuple

# Where an export records its metadata inside a version directory (``serving.export``).
METADATA_DIR = "assets.extra"
METADATA_FILE = "dnc_metadata.json"

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_VERSION_RE = re.compile(r"0|[1-9][0-9]{0,17}")  # canonical, fits in an int64


def validate_model_name(name: str) -> str:
    """Checks a model name or version label: ``[A-Za-z0-9_.-]``, never a path.

    Args:
        name: the name to check.

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: for an empty, too long, path-like (``/``, ``..``, ``.``) or otherwise
            invalid name, or a non-string.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"invalid model name {name!r}: use 1-128 characters of [A-Za-z0-9_.-], not '.' or '..'"
        )
    if ".." in name:
        raise ValueError(f"invalid model name {name!r}: '..' is not allowed")
    return name


def parse_version_dir(entry: str) -> Optional[int]:
    """Returns the version a directory name stands for, or None if it is not a version.

    Only canonical decimal integers that fit in an int64 are versions (``"7"``, not
    ``"07"``, ``"+7"``, ``"7.0"``, ``"٧"`` or a 30-digit number), so two directories never
    map to the same version and a hostile name cannot overflow anything.
    """
    if isinstance(entry, str) and _VERSION_RE.fullmatch(entry):
        return int(entry)
    return None


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which on-disk versions to serve (``latest`` N, ``all`` or ``specific`` versions)."""

    kind: str = "latest"
    num_versions: int = 1
    versions: Tuple[int, ...] = ()

    def select(self, candidates: Sequence[int]) -> List[int]:
        """Returns the versions to serve among ``candidates`` (loadable on-disk versions)."""
        ordered = sorted(set(candidates), reverse=True)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            wanted = set(self.versions)
            return [v for v in ordered if v in wanted]
        return ordered[: max(1, self.num_versions)]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One served model: a name and a base path holding integer version directories."""

    name: str
    base_path: str
    version_labels: Mapping[str, int] = dataclasses.field(default_factory=dict)
    policy: VersionPolicy = dataclasses.field(default_factory=VersionPolicy)

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        if not self.base_path or "\0" in self.base_path:
            raise ValueError(f"model {self.name!r}: invalid base_path {self.base_path!r}")
        for label in self.version_labels:
            validate_model_name(label)


def parse_model_config_text(text: str) -> List[ModelConfig]:
    """Parses a text-format ``tensorflow.serving.ModelServerConfig``.

    Raises:
        ValueError: for unparsable text, a custom model config, or invalid entries.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ValueError(f"cannot parse the model config file: {e}") from e
    if config.WhichOneof("config") == "custom_model_config":
        raise ValueError("custom_model_config is not supported; use model_config_list")
    models: List[ModelConfig] = []
    for entry in config.model_config_list.config:
        platform = entry.model_platform or "tensorflow"
        if platform != "tensorflow":
            raise ValueError(f"model {entry.name!r}: unsupported model_platform {platform!r}")
        which = entry.model_version_policy.WhichOneof("policy_choice")
        if which == "all":
            policy = VersionPolicy("all")
        elif which == "specific":
            policy = VersionPolicy(
                "specific", versions=tuple(entry.model_version_policy.specific.versions)
            )
        else:
            n = entry.model_version_policy.latest.num_versions if which == "latest" else 1
            policy = VersionPolicy("latest", num_versions=n or 1)
        models.append(ModelConfig(entry.name, entry.base_path, dict(entry.version_labels), policy))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate model names in the config: {names}")
    if not models:
        raise ValueError("the model config lists no models")
    return models
