"""Data files of the built-in hardware/model catalog (``gpus.yaml``, ``models.yaml``).

A package only so that setuptools ships the YAML files as package data.
"""
