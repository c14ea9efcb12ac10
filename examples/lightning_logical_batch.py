"""sdebatch in an existing Lightning project: one callback, nothing else changes.

A tiny next-token model on synthetic variable-length sequences, trained with logical batch 64 at a per-device batch
of 8 (8 accumulation steps on one device; ``--devices 2`` runs DDP on CPU with 4). The loss is summed over valid
tokens and reported with ``sdebatch.lightning.count``, so the update is the exact token mean over the logical batch.
The lr follows a warmup-cosine schedule in samples. On one device the run is checked against a plain loop written
below: AdamW on batches of 64, the token-mean loss, the same schedule (float64, so the check is at round-off).
Run: ``python examples/lightning_logical_batch.py`` (< 1 minute).
"""
import argparse
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

import sdebatch
import sdebatch.lightning as sl
from sdebatch.data import ResumableDataLoader, ResumableSampler

VOCAB, SEQ = 32, 24


def make_data(n: int, seed: int = 0):
    """Noisy arithmetic sequences x_{t+1} = x_t + step (mod VOCAB), with random lengths (padding masked out)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    seq = (start + step * torch.arange(SEQ + 1)) % VOCAB
    noise = torch.rand(n, SEQ + 1, generator=g) < 0.05
    seq = torch.where(noise, torch.randint(0, VOCAB, seq.shape, generator=g), seq)
    length = torch.randint(SEQ // 3, SEQ + 1, (n,), generator=g)
    mask = torch.arange(SEQ)[None, :] < length[:, None]
    return TensorDataset(seq[:, :-1], seq[:, 1:], mask)


class NextToken(pl.LightningModule):
    def __init__(self, width: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.rnn = torch.nn.GRU(width, width, batch_first=True)
        self.head = torch.nn.Linear(width, VOCAB)

    def training_step(self, batch, batch_idx):
        x, y, mask = batch
        logits = self.head(self.rnn(self.embed(x))[0])
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        n_tokens = mask.sum()
        sl.count(self, num_items=n_tokens, num_tokens=n_tokens)  # the loss below is a sum over n_tokens
        self.log("loss", (nll * mask).sum() / n_tokens, prog_bar=True, batch_size=len(x))
        return (nll * mask).sum()

    def configure_optimizers(self):  # reference hyperparameters, tuned for the logical batch
        return torch.optim.AdamW(self.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--logical", type=int, default=64)
    parser.add_argument("--per-device", type=int, default=None, help="default: 8 // devices x devices ... = 8 total")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    per_device = args.per_device or max(1, 8 // args.devices)
    data = make_data(args.samples)
    loader = ResumableDataLoader(data, per_device, sampler=ResumableSampler(len(data), shuffle=False))
    total = args.epochs * len(data)
    callback = sl.LogicalBatch(args.logical, lr_schedule=sdebatch.warmup_cosine(total=total, warmup=total // 10),
                               ema_rho=0.99)
    # on a terminal Lightning's bar; in a log or a pipe a line every 5 s instead of thousands of bar redraws
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, max_epochs=args.epochs, precision="64-true",
                         callbacks=[callback, sl.ProgressLines(every_s=5.0)], logger=False,
                         enable_checkpointing=False, use_distributed_sampler=False, enable_model_summary=False,
                         enable_progress_bar=sys.stdout.isatty())
    torch.manual_seed(0)
    model = NextToken()
    trainer.fit(model, train_dataloaders=loader)
    opt = callback.optimizer
    if trainer.is_global_zero:
        print(f"done: {opt.updates} updates, {opt.samples_seen} samples, {opt.tokens_seen} tokens; "
              f"last kappa {opt.last_kappa:g}; train loss {float(trainer.callback_metrics['loss']):.3f} nats/token")
    if args.devices == 1:
        return check(model, data, args.logical, args.epochs, callback.lr_schedule)
    return 0


def check(model: NextToken, data, logical: int, epochs: int, schedule) -> int:
    """The same training as a plain loop at the big batch: one AdamW step per logical batch on its token mean."""
    torch.manual_seed(0)
    ref = NextToken()
    opt = ref.configure_optimizers()
    base, seen = opt.param_groups[0]["lr"], 0
    x, y, mask = data.tensors
    for _ in range(epochs):
        for i in range(0, len(x), logical):
            xb, yb, mb = x[i:i + logical], y[i:i + logical], mask[i:i + logical]
            seen += len(xb)
            opt.param_groups[0]["lr"] = base * schedule(seen)  # the clock after this update, as ClockSchedule
            logits = ref.head(ref.rnn(ref.embed(xb))[0])
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), yb, reduction="none")
            opt.zero_grad()
            ((nll * mb).sum() / mb.sum()).backward()
            opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    print(f"max |parameter - big-batch reference| = {diff:.2e}")
    return 0 if diff < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
