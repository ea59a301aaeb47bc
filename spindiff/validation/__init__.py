"""Validation experiments of the sphere mathematics on known densities."""
