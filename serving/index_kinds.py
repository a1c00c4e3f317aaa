"""The index kinds an export builds per cluster (``dnc export --index``, ``serving.index``).

A module of its own, without TensorFlow, so that parsers and configs can list them.
"""

INDEX_KINDS = ("scann", "brute-force")
