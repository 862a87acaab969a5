"""Build the default bundle: ``python build.py --output out/`` is ``pyannote-bundle build``.

Any option of ``pyannote-bundle build`` is accepted (see ``python build.py --help``).
"""

import sys

from bundler.cli import main

if __name__ == "__main__":
    main(["build", *sys.argv[1:]])
