"""sdebatch with the Hugging Face Trainer: a tiny Llama (built from a config, nothing downloaded) trained at logical
batch 16 with 4 sequences per device; LogicalBatchTrainer lets Trainer accumulate 4 micro-batches per update and
rescales, counts and logs per update. Checked against the plain Trainer at 16 sequences per device.
Run: ``python examples/hf_trainer.py`` (about 20 s)."""
import argparse
import os
import sys
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from sdebatch.hf import LogicalBatchTrainer  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(torch.float64)


def dataset(n):
    """Sequences of 4-24 tokens: each micro-batch carries a different number of loss-bearing tokens."""
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 64, (int(torch.randint(4, 25, (1,), generator=g)),), generator=g)}
            for _ in range(n)]


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])], mask[i, :len(r["input_ids"])] = r["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--logical", type=int, default=16)
    ap.add_argument("--per-device", type=int, default=4)
    args = ap.parse_args(argv)
    data = dataset(args.samples)
    with tempfile.TemporaryDirectory() as out:
        def arguments(per_device):
            return transformers.TrainingArguments(out, per_device_train_batch_size=per_device, num_train_epochs=2,
                                                  learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2,
                                                  max_grad_norm=1.0, logging_steps=2, save_strategy="no",
                                                  report_to=[], use_cpu=True, disable_tqdm=True, seed=3)
        trainer = LogicalBatchTrainer(model=tiny_llama(), args=arguments(args.per_device), train_dataset=data,
                                      data_collator=collate, logical_batch_size=args.logical)
        trainer.train()
        reference = transformers.Trainer(model=tiny_llama(), args=arguments(args.logical), train_dataset=data,
                                         data_collator=collate)
        reference.train()
    opt = trainer.logical_batch_optimizer
    print(f"{opt.updates} updates (reference {reference.state.global_step}), {opt.samples_seen} samples, "
          f"{opt.tokens_seen} tokens")
    diff = max((a - b).abs().max().item() for a, b in zip(trainer.model.parameters(), reference.model.parameters()))
    print(f"max |parameter - big-batch reference| = {diff:.2e}")
    return 0 if diff < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
