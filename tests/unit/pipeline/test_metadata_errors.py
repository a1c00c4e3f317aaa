"""ML Metadata: an unknown type is an empty answer, a broken store is an error."""

import pytest

from pipeline import metadata


def test_unknown_type_is_empty_and_a_broken_store_raises(tmp_path):
    path = tmp_path / "mlmd.sqlite"
    md = metadata.Metadata(metadata.connection_config(str(path)), "p")
    assert md.artifacts_by_type("NeverRegistered") == []
    ref = metadata.ArtifactRef(type_name="Examples", uri=str(tmp_path), fingerprint="f")
    assert md.external_artifact(ref).id > 0
    path.write_bytes(b"not a database" * 512)
    # Before: any error read as "type not registered", which silently turned off
    # blessing against the pushed model.
    with pytest.raises(Exception, match="not a database"):
        md.artifacts_by_type("Examples")
    with pytest.raises(Exception, match="not a database"):
        md.external_artifact(ref)
