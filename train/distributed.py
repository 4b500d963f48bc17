"""torchrun support: the process group from torchrun's environment, and who writes files.

``torchrun --nproc_per_node N headless.py workflow.json`` starts N copies of the headless runner with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` set; the trainer calls ``init_from_env()``
first, which joins the group (NCCL on CUDA, gloo on CPU) once. Outside torchrun nothing happens.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def init_from_env() -> tuple[int, int]:
    """(rank, world size); joins torchrun's process group when its environment says so and none is joined yet."""
    dist = torch.distributed
    if not dist.is_available():
        return 0, 1
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ
    if torchrun and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU a process: host.compute_device() is it
    if not dist.is_initialized() and torchrun:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend)
        log.info("ComfyUI-StableCascade: training rank %d of %d (%s).", dist.get_rank(), dist.get_world_size(), backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True outside a process group and on rank 0: the process that writes LoRA files, states and images."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
