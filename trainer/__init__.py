"""Two-tower divide-and-conquer retrieval models (TFRS)."""

import dnc_env  # noqa: F401  (selects tf-keras before TensorFlow is imported)
