"""A small LightningModule and the Trainer runs the Lightning tests compare (importable by spawned ranks)."""
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

import sdebatch.lightning as sl
from sdebatch.data import ResumableDataLoader, ResumableSampler
from reference import OPTIMIZERS, make_data, make_model, sample_loss_mean, token_loss_sum


class Regression(pl.LightningModule):
    def __init__(self, opt_name="adamw", protocol="mean", scheduler=None):
        super().__init__()
        self.net = make_model()
        self.opt_name, self.protocol, self.scheduler = opt_name, protocol, scheduler
        self.lrs = []  # (samples_seen, reference lr, effective lr) after each update

    def training_step(self, batch, batch_idx):
        x, y, mask = batch
        if self.protocol == "mean":
            return sample_loss_mean(self.net, x, y)
        s, n = token_loss_sum(self.net, x, y, mask)
        sl.count(self, num_items=n, num_tokens=n)
        return s

    def on_train_batch_end(self, outputs, batch, batch_idx):
        opt = sl.find_optimizer(self)
        if opt.did_update:
            self.lrs.append((opt.samples_seen, opt.param_groups[0]["lr"], opt.effective_hyperparameters()[0]["lr"]))

    def configure_optimizers(self):
        cls, kw = OPTIMIZERS[self.opt_name]
        opt = cls(self.parameters(), **kw)
        if self.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def loader(n, batch, *, shuffle=False, seed=0, num_replicas=None, rank=None):
    x, y, mask = make_data(n=n)
    sampler = ResumableSampler(n, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank)
    return ResumableDataLoader(TensorDataset(x, y, mask), batch, sampler=sampler)


def trainer(callback, *, devices=1, epochs=2, ckpt_dir=None, every=None, strategy=None, **kw):
    callbacks = [callback]
    if every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1,
                                                      filename="{step}"))
    return pl.Trainer(devices=devices, strategy=strategy or ("ddp" if devices > 1 else "auto"),
                      max_epochs=epochs, enable_model_summary=False, enable_checkpointing=bool(every),
                      callbacks=callbacks, use_distributed_sampler=False,
                      **{"precision": "64-true", "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                         **kw})


def flat_params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def ddp_rank(rank, world, port, per_device, logical, opt_name, protocol, n, shuffle, out, strategy="ddp"):
    """One rank launched like torchrun (env vars), so Lightning's strategy='ddp' runs without re-executing pytest."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world))
    torch.set_default_dtype(torch.float32 if strategy == "fsdp" else torch.float64)  # FSDP has no 64-bit mode
    torch.set_num_threads(1)
    module = Regression(opt_name, protocol)
    cb = sl.LogicalBatch(logical, verbose=False)
    if strategy == "fsdp":  # torch's FSDP needs an accelerator: this branch runs on a machine with 2 GPUs
        t = trainer(cb, devices=world, strategy=strategy, precision="32-true", accelerator="cuda")
    else:
        t = trainer(cb, devices=world, strategy=strategy)
    t.fit(module, train_dataloaders=loader(n, per_device, shuffle=shuffle, seed=3))
    full = t.strategy.lightning_module_state_dict()  # gathers FSDP shards (a collective: every rank calls it)
    if rank == 0:
        params = torch.cat([full[k].flatten() for k in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")])
        torch.save({"params": params, "clock": cb.optimizer.clock.state_dict(), "lrs": module.lrs}, out)
    t.strategy.barrier()
    torch.distributed.destroy_process_group()
    # as in ddp_worker.py: skip an interpreter teardown that gloo's threads occasionally abort
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class ShardedRegression(Regression):
    """Regression sharded with FSDP2 over the data-parallel dimension of ModelParallelStrategy's mesh."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2], self.net):
            fully_shard(layer, mesh=mesh)


def parallel_rank(rank, world, port, kind, per_device, logical, n, out, options, ckpt_dir=None, every=None,
                  resume=None):
    """One rank of a 2-rank Lightning run on CPU over gloo, float64: ``kind`` "ddp" (strategy='ddp') or "fsdp2"
    (ModelParallelStrategy, FSDP2 through configure_model); token-weighted losses; optional checkpoints every
    ``every`` batches into ``ckpt_dir``, or a resume from ``resume``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world))
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    cb = sl.LogicalBatch(logical, verbose=False, **options)
    if kind == "fsdp2":
        module = ShardedRegression("adamw", "sum")
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                         process_group_backend="gloo")
        # precision "32-true" casts nothing: the float64 default dtype makes the parameters float64
        t = trainer(cb, devices=world, strategy=strategy, ckpt_dir=ckpt_dir, every=every, precision="32-true")
    else:
        module = Regression("adamw", "sum")
        t = trainer(cb, devices=world, strategy="ddp", ckpt_dir=ckpt_dir, every=every)
    error = None
    try:
        t.fit(module, train_dataloaders=loader(n, per_device, num_replicas=world, rank=rank), ckpt_path=resume)
    except RuntimeError as e:
        error = str(e)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in module.parameters()]
    params = torch.cat([p.detach().flatten() for p in params])
    estimator = cb.optimizer.noise_scale_estimator
    if rank == 0:
        torch.save({"params": params, "clock": cb.optimizer.clock.state_dict(), "error": error,
                    "noise": estimator.state_dict() if estimator is not None else None}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
