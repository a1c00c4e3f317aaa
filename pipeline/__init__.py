"""The ``dnc`` command line and the TFX-style pipeline."""

import dnc_env  # noqa: F401  (selects tf-keras before TensorFlow is imported)
