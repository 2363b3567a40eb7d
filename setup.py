"""Kept for tools that still call setup.py; all metadata and settings live in pyproject.toml."""

from setuptools import setup

setup()
