"""Raw interaction logs -> clustered, split, model-ready data (Beam + TFT)."""

import dnc_env  # noqa: F401  (selects tf-keras before TensorFlow is imported)
