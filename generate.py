#!/usr/bin/env python
"""Generate with a trained adapter: python generate.py --lora_weights DIR_OR_HUB_ID --instruction "..."."""

import sys

from mlora.generate import main

if __name__ == "__main__":
    sys.exit(main())
