"""DistributedDataParallel on CPU with gloo, started the way torchrun starts it (RANK, WORLD_SIZE, MASTER_ADDR/PORT
in the environment; the trainer joins the group): 2 processes with half the batch each give the LoRA (and adaptive
buckets) of 1 process with the whole batch, within 1e-5."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from train_helpers import DDP_SETTINGS, ddp_worker, tiny_cache, tiny_stage_c

from comfyui_stablecascade import host
from comfyui_stablecascade.train.loop import TrainSettings, train


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_two_processes_with_half_the_batch_equal_one_with_the_whole_batch(tmp_path):
    single = train(host.wrap(tiny_stage_c(), "stage_c"), None, tiny_cache(5), TrainSettings(**DDP_SETTINGS))
    out = tmp_path / "rank0.safetensors"
    # fork where the platform has it: the workers inherit the imported torch and pack (spawn re-imports both, about
    # half a minute on a loaded 2-core machine); the parent holds no process group, so forking is safe here.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(ddp_worker, args=(2, port, str(out)), nprocs=2, join=True, start_method=method)
    ddp = load_file(str(out))
    assert int(ddp.pop("world")) == 2, "the workers did not join one process group"
    ref = dict(single.lora, **{"adaptive.losses": single.state["tensors"]["adaptive.losses"]})
    assert ddp.keys() == ref.keys()
    moved = 0
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=0, atol=1e-5, msg=k)
        moved += int("lora_down" in k and ref[k].abs().max() > 1e-5)
    assert moved > 0, "the runs should have trained something"
