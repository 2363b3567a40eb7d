#!/usr/bin/env python3
"""mlora launcher: `gen` writes a run config, `run` trains and evaluates it, `avail` lists
templates and tasks. See `python launch.py --help`; the work is done in mlora.cli."""

import sys

from mlora.cli import main

if __name__ == "__main__":
    sys.exit(main())
