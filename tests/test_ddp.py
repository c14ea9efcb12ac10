"""Two processes (DDP over gloo, CPU) with per-device batch 4 and accumulation 2 equal one big-batch process."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from reference import big_batch_run, flat, make_data
import ddp_worker


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("opt_name,protocol,n", [
    ("adamw", "sum", 96),
    ("adamw", "sum", 88),     # ragged last window: 8 samples, one no_sync micro-step per rank, then flush
    ("sgd_momentum", "mean", 96),
])
def test_two_process_ddp_equals_big_batch(tmp_path, opt_name, protocol, n):
    out = tmp_path / "rank0.pt"
    mp.start_processes(ddp_worker.run, args=(2, _free_port(), opt_name, protocol, n, str(out)), nprocs=2,
                       join=True, start_method="spawn")
    got = torch.load(out)
    data = make_data(n=n)
    ref = big_batch_run(opt_name, data, 16, token_weighted=(protocol == "sum"))
    assert torch.allclose(got["params"], flat(ref), atol=1e-10, rtol=0)
    assert got["clock"]["samples_seen"] == 2 * n
    if protocol == "sum":
        assert got["clock"]["tokens_seen"] == 2 * int(data[2].sum())
