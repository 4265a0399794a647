"""Maintenance scripts; run from the repository root as modules: python -m scripts.NAME (so demo_core imports without a sys.path edit)."""
