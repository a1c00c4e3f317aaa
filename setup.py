"""Installs the project's packages and the ``dnc`` console script.

Dependencies are installed from requirements.lock (exact versions + hashes); the
loose requirements below only document what the code imports.
"""

from setuptools import find_packages, setup

setup(
    name="dnc-retrieval",
    version="0.1.0",
    description="Divide-and-conquer embedding-based retrieval on TensorFlow Recommenders",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["preprocessing*", "trainer*", "serving*", "pipeline*"]),
    py_modules=["dnc_env"],
    install_requires=[
        "tensorflow==2.16.2",
        "tf-keras==2.16.0",
        "tensorflow-recommenders==0.7.7",
        "scann==1.3.2",
        "tensorflow-transform==1.16.0",
        "tfx-bsl==1.16.1",
        "apache-beam[gcp]==2.59.0",
        "pyarrow==10.0.1",
        "pandas<2",
        "protobuf>=4.25,<4.26",
        "tensorflow-serving-api==2.16.1",
        "tensorflow-data-validation==1.16.1",
        "ml-metadata==1.16.0",
        "gensim",
        "scikit-learn",
        "tqdm",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["dnc=pipeline.cli:main"]},
)
