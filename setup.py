"""Packaging glue that pyproject.toml cannot express (everything else is in pyproject.toml).

The public trainer callbacks live in the top-level ``callbacks/`` folder (where users of
the repository look for them) but install as ``cpt.callbacks``, so installing cpt does not
claim the generic top-level name ``callbacks``. ``packages.find`` in pyproject.toml only
finds packages under their own folder names, hence the explicit mapping here.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["cpt", "cpt.*"], exclude=["*.__pycache__"]), "cpt.callbacks"],
    package_dir={"cpt.callbacks": "callbacks"},
)
