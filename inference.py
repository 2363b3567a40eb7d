#!/usr/bin/env python
"""The web UI: python inference.py --lora_weights DIR_OR_HUB_ID [MORE ...] [--base_model B] [--template T]."""

import sys

from mlora.web.server import main

if __name__ == "__main__":
    sys.exit(main())
