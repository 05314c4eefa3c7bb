"""Model variants as data: one ``<name>.json`` per registered model, read by :mod:`models.registry`.

This file only makes the folder a package, so setuptools ships the JSON files as package data
(``[tool.setuptools.package-data] "*" = ["*.json", ...]`` in pyproject.toml).
"""
