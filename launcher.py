"""voxpipe's entry point: `python launcher.py ...`, `python -m launcher ...` and the `voxpipe` script."""

import sys

from voxpipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
