"""SavedModel export and a TensorFlow Serving API compatible server."""

import dnc_env  # noqa: F401  (selects tf-keras before TensorFlow is imported)
