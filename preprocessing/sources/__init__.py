"""Raw data sources. ``read_source`` dispatches on ``SourceConfig.name``."""

from preprocessing.sources.common import InputError, SourceOutputs, check_input, read_source

__all__ = ["InputError", "SourceOutputs", "check_input", "read_source"]
