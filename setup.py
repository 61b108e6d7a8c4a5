"""A shim for tools that still call setup.py: the package metadata is pyproject.toml's [project] table."""

from setuptools import setup

setup()
