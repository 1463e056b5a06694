"""Tests use tiny tensors, where one thread is faster than two contending ones.

Two tiers (``pytest -m "not slow"`` for the fast one, ``pytest`` for everything):

- ``slow``: runs a whole experiment (or shares a module fixture that does), a command line in a
  subprocess, a property over 1,000 generated cases, or takes more than about 1.5 s on 2 cores.
- ``distributed``: starts several processes that talk to each other (torchrun, a process group,
  stage-1 workers). Every such test is slow too (added here), so the fast tier never starts one.

The Hypothesis properties keep their own case counts (1,000, as each file promises and some count
and assert): the fast tier leaves those files out rather than running fewer cases under a profile
and asserting less than they claim.
"""

import os

import pytest

# Every process a test starts gets one thread too, and runs started in-process keep it: an explicit
# setting turns the shared thread budget (threads.py) off, so no test's thread count depends on load.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a whole experiment, a subprocess run of the command line, a 1,000-case "
                                       "property, or over ~1.5 s on 2 cores; left out by -m 'not slow'")
    config.addinivalue_line("markers", "distributed: starts several communicating processes (torchrun, a process "
                                       "group, stage-1 workers); implies slow")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("distributed") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
