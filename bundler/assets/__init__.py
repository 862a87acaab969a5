"""Recordings that bundles ship as smoke samples: package data, read, never imported."""
