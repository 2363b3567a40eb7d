#!/usr/bin/env python3
"""Train and evaluate one run config directly: `python train.py CONFIG --base_model X`
(the same engine and flags as `python launch.py run --config CONFIG`)."""

import sys

from mlora.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
