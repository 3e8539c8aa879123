"""One intra-op thread per pytest-xdist worker, for CPU-heavy tests.

Under `pytest -n 2` on 2 cores, two workers running MKL/OpenMP with 2 threads each spin
against each other: a float64 eigh of 9 x 512² took 12x the CPU time it takes with one
thread. Import the fixture into a test module (``from _helpers_threads import
one_thread_per_worker  # noqa: F401``) and mark it ``pytest.mark.usefixtures`` or autouse.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def one_thread_per_worker():
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
