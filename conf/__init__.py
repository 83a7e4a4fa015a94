"""Hydra configs, shipped inside the package as metaad.conf (see pyproject.toml)."""
