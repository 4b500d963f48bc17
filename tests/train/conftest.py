"""Training tests run tiny networks: one thread is faster for them than two (many small ops) and keeps the suite's
time steady on a shared 2-core machine. The thread count is restored after each test."""

import pytest
import torch

from comfyui_stablecascade import host


@pytest.fixture(autouse=True)
def _one_thread_clean_host():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    host.unload_all()
    host.request_interrupt(False)
    yield
    host.request_interrupt(False)
    host.unload_all()
    torch.set_num_threads(threads)
