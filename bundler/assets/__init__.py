"""Scripts run inside a bundled environment (not imported by the tool)."""
