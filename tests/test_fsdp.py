"""FSDP2 (fully_shard) on CPU with gloo, 2 ranks, float64: the wrapper around sharded parameters equals one process
training at the big batch."""
import pytest
import torch
import torch.multiprocessing as mp

from reference import OPTIMIZERS, big_batch_run, flat, make_data, make_model, token_loss_sum
import fsdp_worker

pytest.importorskip("torch.distributed.fsdp")


def run_two_ranks(tmp_path, n=88, per_device=4, options=None, stop_at=-1, no_sync=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "rank0.pt"
    mp.start_processes(fsdp_worker.run, args=(2, str(tmp_path / "rendezvous"), str(out), n, per_device,
                                              options or {}, stop_at, no_sync),
                       nprocs=2, join=True, start_method="spawn")
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("max_grad_norm", [None, 0.3])
def test_fsdp2_accumulation_equals_the_big_batch(tmp_path, max_grad_norm):
    """Per-device 4 x 2 ranks x 2 accumulation = 16 per update; token-weighted losses (the window divided by its
    valid tokens over both ranks); 88 samples, so each epoch ends on a short window of 8 samples that flush()
    applies (rule "none": the oracle steps on it unrescaled); clipping once per update on the global norm of the
    sharded gradient."""
    got = run_two_ranks(tmp_path, options={"rule": "none", "max_grad_norm": max_grad_norm})
    assert "error" not in got, got.get("error")
    ref = big_batch_run("adamw", make_data(n=88), 16, token_weighted=True, max_grad_norm=max_grad_norm)
    assert torch.allclose(got["params"], flat(ref), atol=1e-10, rtol=0)
    assert got["clock"]["updates"] == 12 and got["clock"]["samples_seen"] == 176
    assert got["clock"]["tokens_seen"] == 2 * int(make_data(n=88)[2].sum())
    if max_grad_norm is not None:
        assert got["grad_norm"] > max_grad_norm  # it did clip


def test_fsdp2_sharded_checkpoint_mid_window_resumes_exactly(tmp_path):
    """Each rank saves its shards of the model, the optimizer state and the open window's gradients at micro-step 5
    (inside a window of 4 micro-steps at per-device 2), reloads them into a freshly sharded model, and continues:
    the same parameters as the uninterrupted run."""
    options = {"max_grad_norm": 0.3}
    whole = run_two_ranks(tmp_path / "a", n=48, per_device=2, options=options)
    resumed = run_two_ranks(tmp_path / "b", n=48, per_device=2, options=options, stop_at=5)
    assert "error" not in resumed, resumed.get("error")
    assert torch.allclose(resumed["params"], whole["params"], atol=1e-12, rtol=0)
    assert resumed["clock"] == whole["clock"]
    ref = big_batch_run("adamw", make_data(n=48), 16, token_weighted=True, max_grad_norm=0.3)
    assert torch.allclose(whole["params"], flat(ref), atol=1e-10, rtol=0)


def test_fsdp2_without_gradient_sync_is_refused(tmp_path):
    """FSDP2's set_requires_gradient_sync(False) keeps micro-steps' gradients out of .grad: a short window flushed
    there would apply nothing while the clock counts it, and leak into the next epoch. The wrapper sees nothing
    backpropagated and says to leave sync on."""
    got = run_two_ranks(tmp_path, options={"rule": "none"}, no_sync=True)
    assert "set_requires_gradient_sync" in got["error"]


def test_fsdp2_noise_scale_equals_the_two_size_formula_by_hand(tmp_path):
    """Sharded gradients are out of the per-micro-batch hooks' reach: the small batch is the window's first micro-step
    over both ranks (2 x 4 samples, reduce-scattered), the big one the window (16). Each window's observation and
    the EMA equal the two-size formula on token-weighted gradients taken here by hand along the big-batch run."""
    got = run_two_ranks(tmp_path, n=96, per_device=4, options={"estimate_noise_scale": True,
                                                                "noise_scale_warn": None})
    assert "error" not in got, got.get("error")
    x, y, mask = make_data(n=96)
    model = make_model()
    cls, kw = OPTIMIZERS["adamw"]
    opt = cls(model.parameters(), **kw)

    def grad(sl):
        model.zero_grad()
        s, c = token_loss_sum(model, x[sl], y[sl], mask[sl])
        (s / c).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g2_ema = trace_ema = 0.0
    for _ in range(2):
        for w in range(0, 96, 16):
            small, whole = grad(slice(w, w + 8)).square().sum(), grad(slice(w, w + 16)).square().sum()
            g2, trace = (16 * whole - 8 * small) / 8, (small - whole) / (1 / 8 - 1 / 16)
            g2_ema, trace_ema = 0.95 * g2_ema + 0.05 * float(g2), 0.95 * trace_ema + 0.05 * float(trace)
            opt.step()  # the big-batch step on the window's gradient just computed
    assert got["noise"]["count"] == 12
    assert got["noise"]["g2"] == pytest.approx(g2_ema, rel=1e-9)
    assert got["noise"]["trace"] == pytest.approx(trace_ema, rel=1e-9)
