"""``python -m memefx``: the ``memefx`` command for environments without the console script on PATH."""

import sys

from memefx.cli import main

if __name__ == "__main__":
    sys.exit(main())
