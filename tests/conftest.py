"""Suite-wide settings."""

import os

import torch

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels' tests run through Triton's interpreter. The switch is read
    # when triton is first imported, and bitsandbytes or transformers may import it before the
    # kernel tests do, so it is set here, before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
