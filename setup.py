"""Installs the top-level folders under one name: ``jobs/`` as ``clray.jobs``,
``pipelines/`` as ``clray.pipelines``, ``models/`` as ``clray.models`` (the repository
root is the ``clray`` package, whose ``__init__.py`` holds the public API), and the
shipped configs as package data. Without the mapping a plain install would put
top-level packages called ``jobs``, ``pipelines`` and ``models`` into site-packages,
where they collide with a user's own ``models`` package. Everything else about the
distribution is in pyproject.toml."""

from setuptools import find_packages, setup

FOLDERS = ("jobs", "pipelines", "models")

setup(
    package_dir={"clray": "."},
    packages=["clray", "clray.configs"]
    + [f"clray.{name}" for name in find_packages(include=[f"{folder}*" for folder in FOLDERS])],
    package_data={"clray.configs": ["*.toml"]},
)
