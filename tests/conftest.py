"""Test session set-up. Runs before fcnkern is imported anywhere:

- without a CUDA device, Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET must be set before
  the kernels are defined);
- FCNKERN_POISON=1 makes every op fill its fresh outputs with NaN before the kernel runs, so an element a kernel
  forgets to write fails the parity checks instead of passing on leftover memory;
- Hypothesis runs derandomized (the same examples every run, so CI is reproducible); HYPOTHESIS_PROFILE=explore
  searches fresh random examples, more of them;
- fp32 means fp32: PyTorch lets cuDNN use TF32 for fp32 convolutions by default, and fcnkern's Triton kernels follow
  that switch, so every test runs with it off (tests/test_tf32.py checks the TF32 path at TF32 precision);
- under pytest-xdist (the README's ``-n auto``) each worker takes its share of the cores but at least 2 threads, so
  the CPU kernels' multi-thread paths (per-thread partial sums, work split across threads) run in every test as in
  a plain run on a 2-core machine, with OpenMP's threads waiting passively;
- FCNKERN_FAILURE_LOG=FILE appends each failure's report to FILE as it happens (the GPU suite runs under a time
  limit that can cut pytest off before its summary).
"""

import os

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Before torch loads OpenMP: its threads spin while waiting, and two workers' spinning threads on the same cores
    # made the CPU kernels' tests 3x slower than in one process; passive waiting makes them as fast.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None)
settings.register_profile("explore", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FCNKERN_POISON", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(2, (os.cpu_count() or 2) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _fp32_without_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def pytest_runtest_logreport(report):
    path = os.environ.get("FCNKERN_FAILURE_LOG")
    # Under pytest-xdist the controller gets every worker's reports; log there only, once.
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
