"""The Lightning callback: splits into micro-batches and devices give the same run, to round-off."""
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import sdebatch
import sdebatch.lightning as sl
from lightning_helpers import Regression, ddp_rank, flat_params, loader, parallel_rank, trainer
from reference import big_batch_run, flat, make_data, sample_loss_mean

N = 96


def fit(per_device, logical, *, opt_name="adamw", protocol="mean", shuffle=False, epochs=2, **cb_kw):
    module = Regression(opt_name, protocol)
    cb = sl.LogicalBatch(logical, verbose=False, **cb_kw)
    trainer(cb, epochs=epochs).fit(module, train_dataloaders=loader(N, per_device, shuffle=shuffle, seed=3))
    return module, cb


@pytest.mark.parametrize("protocol", ["mean", "sum"])
def test_accumulation_equals_big_batch(protocol):
    a, cb_a = fit(4, 16, protocol=protocol)       # 4 per device x 4 accumulation
    b, cb_b = fit(16, 16, protocol=protocol)      # 16 per device, no accumulation
    ref = big_batch_run("adamw", make_data(n=N), 16, token_weighted=(protocol == "sum"))
    assert cb_a.optimizer.accumulation_steps == 4 and cb_b.optimizer.accumulation_steps == 1
    assert torch.allclose(flat_params(a.net), flat(ref), atol=1e-10, rtol=0)
    assert torch.allclose(flat_params(b.net), flat(ref), atol=1e-10, rtol=0)
    assert cb_a.optimizer.clock == cb_b.optimizer.clock
    assert cb_a.optimizer.clock.samples_seen == 2 * N and cb_a.optimizer.clock.updates == 12


def test_noise_scale_is_tracked_and_logged():
    """The logger receives opt.noise_scale after each update (the estimator's accuracy is tested in test_noise.py;
    this checks the wiring): a logger that records every call, against the value the module reads after each
    update. Updates whose estimate is still unknown (|G|^2 estimate <= 0 in this noise-dominated regression) log
    no noise_scale."""
    from lightning.pytorch.loggers.logger import Logger

    class Recording(Logger):
        name, version = "recording", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    class Reading(Regression):
        def __init__(self):
            super().__init__("adamw")
            self.noise_scales = []  # opt.noise_scale after each update

        def on_train_batch_end(self, outputs, batch, batch_idx):
            opt = sl.find_optimizer(self)
            if opt.did_update:
                self.noise_scales.append(opt.noise_scale)

    module, logger = Reading(), Recording()
    cb = sl.LogicalBatch(16, verbose=False, estimate_noise_scale=True)
    trainer(cb, epochs=2, logger=logger, log_every_n_steps=1).fit(
        module, train_dataloaders=loader(N, 2, shuffle=False, seed=3))
    opt = cb.optimizer
    estimator = opt.noise_scale_estimator
    assert estimator.count == 12 and estimator.trace_sigma > 0 and len(module.noise_scales) == 12
    known = [v for v in module.noise_scales if v is not None]
    assert len(known) >= 4 and module.noise_scales[-1] == opt.noise_scale
    # each update's value is logged once it is known, and is re-sent unchanged until the next update
    logged = [m["noise_scale"] for _, m in logger.rows if "noise_scale" in m]
    changes = [v for i, v in enumerate(logged) if i == 0 or v != logged[i - 1]]
    assert changes == [v for i, v in enumerate(known) if i == 0 or v != known[i - 1]]
    assert logged[-1] == known[-1]


def test_ragged_epoch_end_is_flushed():
    """96 samples at 4 per device with logical 40: windows of 40, 40, then 16 flushed with kappa 0.4 each epoch."""
    a, cb = fit(4, 40, rule="none")
    ref = big_batch_run("adamw", make_data(n=N), 40, token_weighted=False)
    assert torch.allclose(flat_params(a.net), flat(ref), atol=1e-10, rtol=0)
    assert cb.optimizer.clock.updates == 6 and cb.optimizer.last_kappa == 0.4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["mean", "sum"])
def test_two_devices_ddp_equals_one_device(tmp_path, protocol):
    """devices=2 (strategy='ddp' over gloo) at 2 per device x 4 accumulation = one device at 16 = big batch."""
    out = tmp_path / "rank0.pt"
    mp.start_processes(ddp_rank, args=(2, _free_port(), 2, 16, "adamw", protocol, N, True, str(out)), nprocs=2,
                       join=True, start_method="spawn")
    got = torch.load(out)
    one, cb = fit(16, 16, protocol=protocol, shuffle=True)
    two_acc, cb2 = fit(8, 16, protocol=protocol, shuffle=True)
    assert torch.allclose(flat_params(one.net), flat_params(two_acc.net), atol=1e-10, rtol=0)
    assert torch.allclose(got["params"], flat_params(one.net), atol=1e-8, rtol=0)
    assert got["clock"] == cb.optimizer.clock.state_dict()
    assert [r[:2] for r in got["lrs"]] == [r[:2] for r in one.lrs]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torch's FSDP needs 2 accelerators (none on CPU CI)")
def test_fsdp_runs_and_equals_one_device(tmp_path):
    """strategy='fsdp': gradients are reduce-scattered shards; the result matches one device (float32)."""
    out = tmp_path / "rank0.pt"
    mp.start_processes(ddp_rank, args=(2, _free_port(), 2, 16, "adamw", "sum", N, True, str(out), "fsdp"),
                       nprocs=2, join=True, start_method="spawn")
    got = torch.load(out)
    torch.set_default_dtype(torch.float32)
    module = Regression("adamw", "sum")
    cb = sl.LogicalBatch(16, verbose=False)
    trainer(cb, precision="32-true").fit(module, train_dataloaders=loader(N, 16, shuffle=True, seed=3))
    assert got["clock"] == cb.optimizer.clock.state_dict()
    assert torch.allclose(got["params"], flat_params(module.net), atol=1e-5, rtol=0)


def test_resume_mid_window_equals_uninterrupted(tmp_path):
    """Checkpoint at micro-step 7 (window of 4: mid-window, mid-epoch, shuffled data); resume; same parameters."""
    full, cb_full = fit(4, 16, protocol="sum", shuffle=True, epochs=3)
    module = Regression("adamw", "sum")
    cb = sl.LogicalBatch(16, verbose=False)
    t = trainer(cb, epochs=3, ckpt_dir=tmp_path, every=7)
    t.fit(module, train_dataloaders=loader(N, 4, shuffle=True, seed=3))
    ckpt = tmp_path / "step=7.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["optimizer_states"][0]["sdebatch"]["window"]["micro_steps"] == 3  # mid-window
    resumed = Regression("adamw", "sum")
    cb2 = sl.LogicalBatch(16, verbose=False)
    trainer(cb2, epochs=3).fit(resumed, train_dataloaders=loader(N, 4, shuffle=True, seed=3), ckpt_path=str(ckpt))
    assert torch.allclose(flat_params(resumed.net), flat_params(full.net), atol=1e-10, rtol=0)
    assert cb2.optimizer.clock == cb_full.optimizer.clock
    # and a later checkpoint (step 21, mid-epoch; epoch ends are covered by test_resume_at_every_position)
    resumed2 = Regression("adamw", "sum")
    cb3 = sl.LogicalBatch(16, verbose=False)
    trainer(cb3, epochs=3).fit(resumed2, train_dataloaders=loader(N, 4, shuffle=True, seed=3),
                               ckpt_path=str(tmp_path / "step=21.ckpt"))
    assert torch.allclose(flat_params(resumed2.net), flat_params(full.net), atol=1e-10, rtol=0)


def test_rescale_path_uses_the_rules():
    """32 per device with logical 8 and reparameterize=True: one update per batch, kappa 4, AdamW square-root rule."""
    module, cb = fit(32, 8, reparameterize=True, epochs=1)
    opt = cb.optimizer
    assert opt.last_kappa == 4.0 and opt.clock.updates == 3
    eff = opt.effective_hyperparameters()[0]
    lr, (b1, b2), wd = 0.01, (0.8, 0.95), 0.1
    assert eff["lr"] == pytest.approx(2 * lr, rel=1e-12)
    assert eff["betas"] == pytest.approx((b1 ** 4, b2 ** 4), rel=1e-12)
    assert 1 - eff["lr"] * eff["weight_decay"] == pytest.approx((1 - lr * wd) ** 4, rel=1e-12)
    # the same three updates by the plain optimizer with those values
    x, y, _ = make_data(n=N)
    ref = Regression().net
    plain = torch.optim.AdamW(ref.parameters(), lr=eff["lr"], betas=eff["betas"], eps=eff["eps"],
                              weight_decay=eff["weight_decay"])
    for i in range(0, N, 32):
        plain.zero_grad()
        ((ref(x[i:i + 32]).squeeze(-1) - y[i:i + 32]) ** 2).mean().backward()
        plain.step()
    assert torch.allclose(flat_params(module.net), flat(ref), atol=1e-12, rtol=0)


def test_schedules_follow_samples_whatever_the_split():
    f = sdebatch.warmup_cosine(total=2 * N, warmup=32)
    a, _ = fit(4, 16, lr_schedule=f)
    b, _ = fit(16, 16, lr_schedule=f)
    assert a.lrs == b.lrs and len(a.lrs) == 12
    assert all(ref == pytest.approx(0.01 * f(t), abs=1e-15) for t, ref, _ in a.lrs)
    # a torch scheduler with interval='step' steps once per update, not per batch
    c = Regression(scheduler="step")
    trainer(sl.LogicalBatch(16, verbose=False), epochs=1).fit(c, train_dataloaders=loader(N, 4))
    assert [r[2] for r in c.lrs] == pytest.approx([0.01 * 0.9 ** i for i in range(6)], rel=1e-12)  # used lr


class StepSchedulerRegression(Regression):
    """StepLR(step_size=1, gamma=0.9) with interval="step" and the given frequency; records the reference lr each
    update used (a pre-update hook, so the window flushed at an epoch's end counts too)."""

    def __init__(self, frequency):
        super().__init__(scheduler="step")
        self.frequency, self.used = frequency, []

    def configure_optimizers(self):
        out = super().configure_optimizers()
        out["lr_scheduler"]["frequency"] = self.frequency
        return out

    def on_fit_start(self):  # before a resumed run's pending flush (in the callback's on_train_start)
        sl.find_optimizer(self).register_pre_update_hook(lambda opt, w: self.used.append(opt.param_groups[0]["lr"]))


@pytest.mark.parametrize("frequency", [1, 2])
def test_step_schedulers_step_once_per_update_through_ragged_epochs(tmp_path, frequency):
    """40 samples in batches of 4 at logical 16: each epoch is 2 full windows and 2 batches flushed at its end, 9
    updates in 3 epochs. Update k (from 0) uses StepLR's closed form 0.01 x 0.9**(k // frequency); a run resumed
    from a checkpoint at an epoch's last batch (before its flush) or mid-window goes on with the same lrs."""
    module = StepSchedulerRegression(frequency)
    cb = sl.LogicalBatch(16, verbose=False)
    trainer(cb, epochs=3, ckpt_dir=tmp_path, every=5).fit(module, train_dataloaders=loader(40, 4))
    assert cb.optimizer.updates == 9
    assert module.used == pytest.approx([0.01 * 0.9 ** (k // frequency) for k in range(9)], rel=1e-12, abs=0)
    for step in (10, 15):  # epoch 1's last batch; epoch 2's first window after one batch
        ckpt = tmp_path / f"step={step}.ckpt"
        done = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["sdebatch"]["clock"]["updates"]
        resumed = StepSchedulerRegression(frequency)
        trainer(sl.LogicalBatch(16, verbose=False), epochs=3).fit(
            resumed, train_dataloaders=loader(40, 4), ckpt_path=str(ckpt))
        assert resumed.used == pytest.approx(module.used[done:], rel=1e-12, abs=0) and done == {10: 2, 15: 4}[step]


@pytest.mark.parametrize("cb_kw,trainer_kw,needle", [
    ({}, {"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
    ({}, {"gradient_clip_val": 1.0}, "max_grad_norm"),
    ({"rule": "lamb"}, {}, "rule"),
    ({}, {"max_steps": 16}, r"max_steps=16\) counts optimizer.step\(\) calls, .* once per batch.*max_samples"),
    ({"physical_batch_size": 8}, {}, r"physical_batch_size=8\) but the train dataloader's batch size is 4"),
])
def test_invalid_configuration_fails_before_training(cb_kw, trainer_kw, needle):
    module = Regression()
    before = flat_params(module.net).clone()
    with pytest.raises(ValueError, match=needle):
        trainer(sl.LogicalBatch(16, verbose=False, **cb_kw), **trainer_kw).fit(module, train_dataloaders=loader(N, 4))
    assert torch.equal(flat_params(module.net), before)


def test_physical_above_logical_without_reparameterize_fails_before_training():
    module = Regression()
    before = flat_params(module.net).clone()
    with pytest.raises(ValueError, match="reparameterize=True"):
        trainer(sl.LogicalBatch(8, verbose=False)).fit(module, train_dataloaders=loader(N, 32))
    assert torch.equal(flat_params(module.net), before)


def test_unknown_optimizer_family_fails_before_training():
    class Odd(Regression):
        def configure_optimizers(self):
            return torch.optim.Adagrad(self.parameters(), lr=0.1)
    module = Odd()
    with pytest.raises(ValueError, match="rule='none'"):
        trainer(sl.LogicalBatch(16, verbose=False)).fit(module, train_dataloaders=loader(N, 4))


@pytest.mark.parametrize("logical,every", [(16, 12), (20, 12), (16, 8), (20, 8)])
def test_resume_at_every_position_equals_uninterrupted(tmp_path, logical, every):
    """24 batches of 4 per epoch, 3 epochs; windows of 4 (even: 6 per epoch) or 5 (ragged: 4 full windows and a short
    one of 4 flushed at each epoch end). Checkpoints every ``every`` batches land mid-window, at a window's end, at an
    epoch's end (with and without a pending short window) and at the end of the run; resuming from each gives the
    uninterrupted run's parameters and clock."""
    full, cb_full = fit(4, logical, protocol="sum", shuffle=True, epochs=3)
    module = Regression("adamw", "sum")
    t = trainer(sl.LogicalBatch(logical, verbose=False), epochs=3, ckpt_dir=tmp_path, every=every)
    t.fit(module, train_dataloaders=loader(N, 4, shuffle=True, seed=3))
    steps = sorted(int(p.stem.split("=")[1]) for p in tmp_path.glob("step=*.ckpt"))
    assert 24 in steps and 72 in steps  # an epoch's end and the run's end are among them
    for step in steps:
        resumed = Regression("adamw", "sum")
        cb = sl.LogicalBatch(logical, verbose=False)
        trainer(cb, epochs=3).fit(resumed, train_dataloaders=loader(N, 4, shuffle=True, seed=3),
                                  ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        assert cb.optimizer.clock == cb_full.optimizer.clock, step
        assert torch.allclose(flat_params(resumed.net), flat_params(full.net), atol=1e-10, rtol=0), step


def test_log_cadence_by_hand():
    """Due at the first update, whenever a multiple of log_every_n_steps was passed since, always with a progress bar
    and at the final update; never with log_every_n_steps=0."""
    from types import SimpleNamespace

    def dues(every, steps, bar=None, final_at=None):
        cadence, out = sl.LogCadence(), []
        for s in steps:
            t = SimpleNamespace(log_every_n_steps=every, global_step=s, progress_bar_callback=bar)
            out.append(cadence.due(t, final=(s == final_at)))
        return out

    steps = [3, 6, 9, 12, 15, 18, 21]  # updates every 3 batches
    assert dues(8, steps) == [True, False, True, False, False, True, False]  # first; past 8 at 9, past 16 at 18
    assert dues(8, steps, final_at=12) == [True, False, True, True, False, True, False]
    assert dues(8, steps, bar=object()) == [True] * 7
    assert dues(0, steps, final_at=21) == [False] * 7


class _Recorder(__import__("lightning.pytorch.loggers.logger", fromlist=["Logger"]).Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.records = []

    def log_metrics(self, metrics, step=None):
        self.records.append((step, {k: v for k, v in metrics.items() if k != "epoch"}))

    def log_hyperparams(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("bar", [False, True])
def test_logger_gets_the_clock_at_the_trainers_cadence(bar, monkeypatch):
    """Accumulation 4, Trainer(log_every_n_steps=8), stop at 11 updates: Lightning writes to the logger at batches
    8, 16, ..., 40 and at the stop; each write carries the clock of that batch's update (samples = 16 x updates) and
    the last the final one. The callback logs only at the updates due (first, batches 8, 16, 24, 32, 40, the stop:
    7 of 11) without a bar, at all 11 with one, and the logger's records are the same."""
    import lightning.pytorch as pl

    calls = []
    original = pl.LightningModule.log_dict
    monkeypatch.setattr(pl.LightningModule, "log_dict",
                        lambda self, *a, **k: (calls.append(1), original(self, *a, **k)))
    module, cb, logger = Regression(), sl.LogicalBatch(16, verbose=False, max_samples=176), _Recorder()
    trainer(cb, logger=logger, log_every_n_steps=8, enable_progress_bar=bar).fit(
        module, train_dataloaders=loader(N, 4))
    got = [(step, m["samples_seen"], m["updates"], m["kappa"]) for step, m in logger.records]
    assert got == [(7, 32.0, 2.0, 1.0), (15, 64.0, 4.0, 1.0), (23, 96.0, 6.0, 1.0), (31, 128.0, 8.0, 1.0),
                   (39, 160.0, 10.0, 1.0), (43, 176.0, 11.0, 1.0)]
    assert len(calls) == (11 if bar else 7)


def run_ranks(tmp_path, name, kind, options=None, **kw):
    out = tmp_path / f"{name}.pt"
    mp.start_processes(parallel_rank, args=(2, _free_port(), kind, 2, 16, N, str(out), options or {},
                                            kw.get("ckpt_dir"), kw.get("every"), kw.get("resume")),
                       nprocs=2, join=True, start_method="spawn")
    return torch.load(out)


@pytest.mark.parametrize("max_grad_norm", [None, 0.3])
def test_fsdp2_model_parallel_strategy_equals_the_big_batch(tmp_path, max_grad_norm):
    """Lightning's ModelParallelStrategy (FSDP2 through configure_model) on CPU over gloo, 2 ranks, float64: 2 per
    device x 2 ranks x 4 accumulation, token-weighted, clipped once per update on the sharded gradient's global norm:
    the plain big-batch optimizer at 16 (written in tests/reference.py)."""
    got = run_ranks(tmp_path, "fsdp2", "fsdp2", {"max_grad_norm": max_grad_norm})
    assert got["error"] is None, got["error"]
    ref = big_batch_run("adamw", make_data(n=N), 16, token_weighted=True, max_grad_norm=max_grad_norm)
    assert torch.allclose(got["params"], flat(ref), atol=1e-10, rtol=0)
    assert got["clock"]["updates"] == 12 and got["clock"]["samples_seen"] == 2 * N


def test_fsdp2_model_parallel_strategy_noise_scale_by_hand(tmp_path):
    """The in-run noise scale under ModelParallelStrategy: the window's first micro-step over both ranks (2 x 2
    samples, interleaved by the distributed sampler: samples 0-3 of each window of 16) against the window, the
    two-size formula on token-weighted gradients taken here by hand along the big-batch run."""
    from reference import OPTIMIZERS, make_model, token_loss_sum

    got = run_ranks(tmp_path, "noise", "fsdp2", {"estimate_noise_scale": True, "noise_scale_warn": None})
    assert got["error"] is None, got["error"]
    x, y, mask = make_data(n=N)
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
        for w in range(0, N, 16):
            small, whole = grad(slice(w, w + 4)).square().sum(), grad(slice(w, w + 16)).square().sum()
            g2, trace = (16 * whole - 4 * small) / 12, (small - whole) / (1 / 4 - 1 / 16)
            g2_ema, trace_ema = 0.95 * g2_ema + 0.05 * float(g2), 0.95 * trace_ema + 0.05 * float(trace)
            opt.step()
    assert got["noise"]["count"] == 12
    assert got["noise"]["g2"] == pytest.approx(g2_ema, rel=1e-9)
    assert got["noise"]["trace"] == pytest.approx(trace_ema, rel=1e-9)


def test_fsdp2_checkpoint_at_a_window_end_resumes_exactly_and_mid_window_is_refused(tmp_path):
    """Under ModelParallelStrategy Lightning saves the optimizer through torch.distributed.checkpoint (torch's keys
    only): the clock travels in the callback's state, the inner state in the sharded checkpoint. A checkpoint at a
    window end (batch 8, accumulation 4) resumes to the uninterrupted run; one inside a window is refused."""
    whole = run_ranks(tmp_path, "whole", "fsdp2", ckpt_dir=str(tmp_path / "ck"), every=8)
    assert whole["error"] is None, whole["error"]
    resumed = run_ranks(tmp_path, "resumed", "fsdp2", resume=str(tmp_path / "ck" / "step=8.ckpt"))
    assert resumed["error"] is None, resumed["error"]
    assert torch.allclose(resumed["params"], whole["params"], atol=1e-12, rtol=0)
    assert resumed["clock"] == whole["clock"]
    mid = run_ranks(tmp_path, "mid", "fsdp2", ckpt_dir=str(tmp_path / "ck2"), every=6)
    assert "every_n_train_steps" in mid["error"]


def test_ddp_checkpoint_mid_window_resumes_every_rank_exactly(tmp_path):
    """Lightning saves rank 0's checkpoint only; mid-window each rank holds its own partial gradient and counts.
    The wrapper saves their mean over the ranks, so rank 0's file resumes both ranks on the same trajectory."""
    whole = run_ranks(tmp_path, "whole", "ddp", ckpt_dir=str(tmp_path / "ck"), every=6)
    resumed = run_ranks(tmp_path, "resumed", "ddp", resume=str(tmp_path / "ck" / "step=6.ckpt"))
    assert whole["error"] is None and resumed["error"] is None
    assert torch.allclose(resumed["params"], whole["params"], atol=1e-12, rtol=0)
    assert resumed["clock"] == whole["clock"]
    ref = big_batch_run("adamw", make_data(n=N), 16, token_weighted=True)
    assert torch.allclose(whole["params"], flat(ref), atol=1e-10, rtol=0)


class Validated(Regression):
    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val", sample_loss_mean(self.net, x, y))


@pytest.mark.parametrize("logical,val_check_interval", [(40, None), (16, 10)])
def test_validation_keeps_the_open_window(logical, val_check_interval):
    """Lightning zeroes the gradients before each validation run. At an epoch's end that came before the flush of its
    short window (logical 40: windows of 40, 40, 16; the 16 were lost, 3e-2 off, silently), and a val_check_interval
    of 10 batches falls inside a window of 4 (an error). Both equal the big batch now."""
    module = Validated()
    cb = sl.LogicalBatch(logical, verbose=False, rule="none")
    kw = {} if val_check_interval is None else {"val_check_interval": val_check_interval}
    trainer(cb, num_sanity_val_steps=0, **kw).fit(module, train_dataloaders=loader(N, 4),
                                                   val_dataloaders=loader(16, 4))
    ref = big_batch_run("adamw", make_data(n=N), logical, token_weighted=False)
    assert torch.allclose(flat_params(module.net), flat(ref), atol=1e-10, rtol=0)
    assert cb.optimizer.updates == 2 * -(-N // logical) and cb.optimizer.samples_seen == 2 * N


class ReloadedLarger(Regression):
    def train_dataloader(self):
        return loader(N, 4 if self.current_epoch == 0 else 8)


def test_a_loader_reloaded_with_another_batch_keeps_the_logical_batch():
    """reload_dataloaders_every_n_epochs with batches of 4, then 8: the accumulation follows (4, then 2), as in an
    elastic resume; it counted 8-sample batches as windows of 4 before (kappa 2, 1.3e-2 off, silently)."""
    module = ReloadedLarger()
    cb = sl.LogicalBatch(16, verbose=False)
    trainer(cb, reload_dataloaders_every_n_epochs=1).fit(module)
    ref = big_batch_run("adamw", make_data(n=N), 16, token_weighted=False)
    assert torch.allclose(flat_params(module.net), flat(ref), atol=1e-10, rtol=0)
    assert cb.optimizer.accumulation_steps == 2 and cb.optimizer.updates == 12 and cb.optimizer.last_kappa == 1


def test_a_gradient_accumulation_scheduler_is_refused():
    """Lightning's GradientAccumulationScheduler raises accumulate_grad_batches mid-run, past the set-up check: each
    update would then hold two windows (kappa 2 without reparameterize). Refused at the first batch it affects."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    t = trainer(sl.LogicalBatch(16, verbose=False))
    t.callbacks.append(GradientAccumulationScheduler({0: 1, 1: 2}))
    with pytest.raises(ValueError, match="accumulate_grad_batches became 2"):
        t.fit(Regression(), train_dataloaders=loader(N, 4))


def test_a_short_last_batch_with_a_mean_loss_weighs_by_its_samples():
    """90 samples in batches of 4 at logical 16: the epoch's last window holds batches of 4, 4 and 2. Each
    training_step returns a mean over its batch; the callback weighs it by its samples, so the window is the mean
    over its 10 samples, as the big batch's short last step (it was a mean of means, 1e-2 off, with a warning that
    named a plain-loop fix)."""
    module = Regression()
    cb = sl.LogicalBatch(16, verbose=False, rule="none")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weigh equally")
        trainer(cb).fit(module, train_dataloaders=loader(90, 4))
    ref = big_batch_run("adamw", make_data(n=90), 16, token_weighted=False)
    assert torch.allclose(flat_params(module.net), flat(ref), atol=1e-10, rtol=0)
    assert cb.optimizer.updates == 12 and cb.optimizer.last_batch_size == 10


def test_a_batch_size_fn_of_its_own_may_count_other_than_the_loader():
    """Two views per item: batch_size_fn counts 8 samples in each loader batch of 4, and physical_batch_size=8 says
    so; not refused as a mismatch with the loader. Logical 16 = two batches: the big batch of 8 items per update."""
    module = Regression()
    cb = sl.LogicalBatch(16, physical_batch_size=8, batch_size_fn=lambda b: 2 * len(b[0]), verbose=False)
    trainer(cb).fit(module, train_dataloaders=loader(N, 4))
    ref = big_batch_run("adamw", make_data(n=N), 8, token_weighted=False)
    assert torch.allclose(flat_params(module.net), flat(ref), atol=1e-10, rtol=0)
    assert cb.optimizer.accumulation_steps == 2 and cb.optimizer.samples_seen == 2 * 2 * N


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, n):
        self.data = make_data(n=n)

    def __iter__(self):
        return iter(zip(*self.data))


def test_an_iterable_loader_with_a_short_last_batch_is_exact_and_quiet():
    """An iterable loader has no length, so its last batch is known only at the epoch's end: a short last batch does
    not warn, and the window holding it equals the big batch's short last step."""
    module = Regression()
    cb = sl.LogicalBatch(16, verbose=False, rule="none")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*where the physical batch is")
        trainer(cb).fit(module, train_dataloaders=torch.utils.data.DataLoader(Stream(90), batch_size=4))
    ref = big_batch_run("adamw", make_data(n=90), 16, token_weighted=False)
    assert torch.allclose(flat_params(module.net), flat(ref), atol=1e-10, rtol=0)
    assert cb.optimizer.updates == 12


class FailsOnce(Regression):
    failed = False

    def training_step(self, batch, batch_idx):
        if batch_idx == 5 and not FailsOnce.failed:
            FailsOnce.failed = True
            raise RuntimeError("a bad batch")
        return super().training_step(batch, batch_idx)


def test_a_module_is_restored_after_an_exception_and_fits_again():
    """The callback patches the module's configure_optimizers, backward and validation zero_grad for a fit; after an
    exception inside fit (no teardown from Lightning) they are removed, so the same module fits again (it was refused
    as an optimizer already wrapped)."""
    module = FailsOnce()
    with pytest.raises(RuntimeError, match="a bad batch"):
        trainer(sl.LogicalBatch(16, verbose=False)).fit(module, train_dataloaders=loader(N, 4))
    assert not {"configure_optimizers", "backward", "on_validation_model_zero_grad"} & set(module.__dict__)
    cb = sl.LogicalBatch(16, verbose=False)
    trainer(cb).fit(module, train_dataloaders=loader(N, 4))
    assert cb.optimizer.updates == 12
