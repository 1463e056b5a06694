"""Tests use tiny tensors, where one thread is faster than two contending ones."""

import torch

torch.set_num_threads(1)
