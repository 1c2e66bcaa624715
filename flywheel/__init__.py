"""Flywheel: raw text to a fine-tuned, aligned, evaluated and deployed language model.

The core is the modules here (config, paths, errors, io, net, text, pii, modeling); the packages
beside them build on it in layers (pyproject.toml names the import contracts, docs/development.md
explains them).
"""
