"""Test session set-up. Runs before fcnkern is imported anywhere:

- without a CUDA device, Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET must be set before
  the kernels are defined);
- FCNKERN_POISON=1 makes every op fill its fresh outputs with NaN before the kernel runs, so an element a kernel
  forgets to write fails the parity checks instead of passing on leftover memory;
- Hypothesis runs derandomized (the same examples every run, so CI is reproducible); HYPOTHESIS_PROFILE=explore
  searches fresh random examples, more of them.
"""

import os

import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None)
settings.register_profile("explore", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FCNKERN_POISON", "1")
