"""Tests use tiny tensors, where one thread is faster than two contending ones."""

import os

# Every process a test starts gets one thread too, and runs started in-process keep it: an explicit
# setting turns the shared thread budget (threads.py) off, so no test's thread count depends on load.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
