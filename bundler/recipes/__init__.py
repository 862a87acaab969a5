"""Recipes shipped with pyannote-bundle (TOML files beside this one)."""
