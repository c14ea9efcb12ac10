"""sdebatch.hf.LogicalBatchTrainer against a real transformers.Trainer at the big batch (float64, a tiny Llama built
from a config: nothing downloaded)."""
import math
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sdebatch  # noqa: E402
from sdebatch.hf import LogicalBatchTrainer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB, PAD = 32, 0


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(torch.float64)


def dataset(n, seed=1):
    """Sequences of 3-10 tokens: token counts vary across micro-batches, windows and ranks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 11, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        out.append({"input_ids": ids})
    return out


def collate(rows):
    """Right-padded batch; padding carries no loss (labels -100) and no attention."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = r["input_ids"]
        mask[i, :len(r["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def arguments(tmp_path, per_device, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=per_device, num_train_epochs=2,
                learning_rate=3e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, warmup_steps=2,
                lr_scheduler_type="linear", max_grad_norm=0.5, logging_steps=1, save_strategy="no", report_to=[],
                seed=7, use_cpu=True, dataloader_drop_last=False, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("n,rule", [(48, "auto"), (44, "none")])
def test_accumulated_trainer_equals_the_big_batch_trainer(tmp_path, n, rule):
    """Per-device 2 x 4 accumulation = per-device 8: parameters, the lr schedule stepped per update, clipping once on
    the window's gradient, the window's token count over all its micro-batches, the logged loss and grad norm. At 44
    samples the last window is short (4 samples) and applied (rule none: the plain Trainer does not rescale it)."""
    data = dataset(n)
    ref = transformers.Trainer(model=tiny_llama(), args=arguments(tmp_path / "ref", 8), train_dataset=data,
                               data_collator=collate)
    ref.train()
    ours = LogicalBatchTrainer(model=tiny_llama(), args=arguments(tmp_path / "ours", 2), train_dataset=data,
                               data_collator=collate, logical_batch_size=8, optimizer_options={"rule": rule})
    assert ours.args.gradient_accumulation_steps == 4
    ours.train()
    assert torch.allclose(flat(ours.model), flat(ref.model), atol=1e-10, rtol=0)
    opt = ours.logical_batch_optimizer
    updates = 2 * math.ceil(n / 8)
    assert opt.updates == ref.state.global_step == ours.state.global_step == updates
    assert opt.samples_seen == 2 * n
    assert opt.tokens_seen == 2 * sum(len(r["input_ids"]) for r in data)
    assert ours.lr_scheduler.last_epoch == ref.lr_scheduler.last_epoch == updates  # stepped per update
    got, want = train_logs(ours), train_logs(ref)
    assert len(got) == len(want) == updates
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6)  # Trainer sums the logged loss in float32
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-9)
        assert g["learning_rate"] == pytest.approx(w["learning_rate"], rel=1e-12)
    if n % 8:
        assert got[-1]["kappa"] == pytest.approx(4 / 8) and opt.last_batch_size == 4


def test_reparameterization_equals_a_hand_rescaled_optimizer(tmp_path):
    """Logical 4, per-device 16: one update per batch with kappa = 4 equals a plain Trainer whose AdamW has lr x 2,
    betas ** 4, eps / 2 and (1 - lr' wd') = (1 - lr wd) ** 4, written here by hand; the logged lr is the update's."""
    data = dataset(64)
    lr, wd, b1, b2, eps, k = 3e-3, 0.1, 0.8, 0.95, 1e-8, 4
    kw = dict(lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0)
    ref_model = tiny_llama()
    lr2 = lr * math.sqrt(k)
    inner = torch.optim.AdamW(ref_model.parameters(), lr=lr2, betas=(b1 ** k, b2 ** k), eps=eps / math.sqrt(k),
                              weight_decay=(1 - (1 - lr * wd) ** k) / lr2)
    ref = transformers.Trainer(model=ref_model, args=arguments(tmp_path / "ref", 16, **kw), train_dataset=data,
                               data_collator=collate, optimizers=(inner, None))
    ref.train()
    model = tiny_llama()
    ours_inner = torch.optim.AdamW(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    with pytest.raises(ValueError, match="reparameterize=True"):
        LogicalBatchTrainer(model=model, args=arguments(tmp_path / "ours", 16, **kw), train_dataset=data,
                            data_collator=collate, logical_batch_size=4, optimizers=(ours_inner, None))
    ours = LogicalBatchTrainer(model=model, args=arguments(tmp_path / "ours", 16, **kw), train_dataset=data,
                               data_collator=collate, logical_batch_size=4, optimizers=(ours_inner, None),
                               optimizer_options={"reparameterize": True})
    ours.train()
    assert torch.allclose(flat(ours.model), flat(ref.model), atol=1e-10, rtol=0)
    assert all(h["learning_rate"] == pytest.approx(lr2, rel=1e-12) for h in train_logs(ours))
    assert all(h["kappa"] == 4 for h in train_logs(ours))
    assert ours_inner.param_groups[0]["lr"] == lr  # the reference value stays on the optimizer


def test_resume_from_a_trainer_checkpoint_equals_the_uninterrupted_run(tmp_path):
    data = dataset(40)
    whole = LogicalBatchTrainer(model=tiny_llama(), args=arguments(tmp_path / "whole", 2), train_dataset=data,
                                data_collator=collate, logical_batch_size=8)
    whole.train()
    first = LogicalBatchTrainer(model=tiny_llama(), args=arguments(tmp_path / "part", 2, save_strategy="steps",
                                                                   save_steps=3),
                                train_dataset=data, data_collator=collate, logical_batch_size=8)
    first.train()
    resumed = LogicalBatchTrainer(model=tiny_llama(seed=5), args=arguments(tmp_path / "part", 2), train_dataset=data,
                                  data_collator=collate, logical_batch_size=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    assert torch.allclose(flat(resumed.model), flat(whole.model), atol=1e-10, rtol=0)
    a, b = resumed.logical_batch_optimizer, whole.logical_batch_optimizer
    assert (a.updates, a.samples_seen, a.tokens_seen) == (b.updates, b.samples_seen, b.tokens_seen)


@pytest.mark.parametrize("options,match", [
    ({"batch_schedule": "ramp"}, "sdebatch.lightning.LogicalBatch"),
    ({"estimate_noise_scale": True}, "probe_noise_scale"),
    ({"accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"max_grad_norm": 1.0}, "max_grad_norm"),
])
def test_what_trainer_cannot_run_is_refused_by_name(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        LogicalBatchTrainer(model=tiny_llama(), args=arguments(tmp_path, 2), train_dataset=dataset(8),
                            data_collator=collate, logical_batch_size=8, optimizer_options=options)


def test_a_wrapper_passed_in_is_refused(tmp_path):
    model = tiny_llama()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters()), 8, 2)
    with pytest.raises(ValueError, match="wraps the optimizer itself"):
        LogicalBatchTrainer(model=model, args=arguments(tmp_path, 2), train_dataset=dataset(8), data_collator=collate,
                            logical_batch_size=8, optimizers=(opt, None))


def test_explicit_trainer_accumulation_is_kept(tmp_path):
    trainer = LogicalBatchTrainer(model=tiny_llama(), args=arguments(tmp_path, 2, gradient_accumulation_steps=2),
                                  train_dataset=dataset(8), data_collator=collate, logical_batch_size=8)
    trainer.create_optimizer()
    opt = trainer.logical_batch_optimizer
    assert trainer.args.gradient_accumulation_steps == 2 and opt.window_batch_size == 4 and opt.window_kappa == 0.5


def test_the_wrapper_under_a_plain_trainer_fails_loudly(tmp_path):
    """transformers.Trainer zeroes the model's gradients after every optimizer.step(): a wrapper accumulating there
    would train on the last micro-batch alone. It raises at the second micro-batch, naming LogicalBatchTrainer."""
    model = tiny_llama()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters()), 8, 2)
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path, 2), train_dataset=dataset(16),
                                   data_collator=collate, optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="LogicalBatchTrainer"):
        trainer.train()


def test_two_ranks_equal_the_big_batch_trainer(tmp_path):
    """Two processes over gloo, per-device 2 x accumulation 2 = 8 per update: the window's token count is gathered
    over both ranks and all micro-batches, the clock counts both ranks' samples; equal to one process at batch 8."""
    import socket

    import torch.multiprocessing as mp

    import hf_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(hf_worker.run, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out)
    data = dataset(48)
    ref = transformers.Trainer(model=tiny_llama(), args=arguments(tmp_path / "ref", 8), train_dataset=data,
                               data_collator=collate)
    ref.train()
    assert torch.allclose(got["params"], flat(ref.model), atol=1e-10, rtol=0)
    assert got["clock"]["samples_seen"] == 96 and got["clock"]["updates"] == 12
    assert got["clock"]["tokens_seen"] == 2 * sum(len(r["input_ids"]) for r in data)
    for g, w in zip(got["logs"], train_logs(ref)):
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-9)


class TokenMeanLoss:
    """A custom compute_loss as users write it: the next-token cross-entropy averaged over its own micro-batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        return (loss, out) if return_outputs else loss


def test_a_custom_loss_must_say_how_it_is_normalised(tmp_path):
    """Under the derived accumulation Trainer takes a custom loss of a model with loss kwargs as normalised over the
    window, so a per-micro-batch mean would give a gradient 4x too large (7e-1 off, silently): train() refuses until
    loss_is_scaled_for_ga says which. Told False, on micro-batches of equal token counts, it equals the plain Trainer
    at the big batch with the same compute_loss."""
    data = [{"input_ids": r["input_ids"][:3]} for r in dataset(32)]  # 3 tokens each: equal micro-batches
    kw = dict(lr_scheduler_type="constant", warmup_steps=0, num_train_epochs=1)

    class Ours(TokenMeanLoss, LogicalBatchTrainer):
        pass

    class Plain(TokenMeanLoss, transformers.Trainer):
        pass

    ours = Ours(model=tiny_llama(), args=arguments(tmp_path / "ours", 2, **kw), train_dataset=data,
                data_collator=collate, logical_batch_size=8)
    before = flat(ours.model).clone()
    with pytest.raises(ValueError, match="loss_is_scaled_for_ga"):
        ours.train()
    assert torch.equal(flat(ours.model), before)
    ours.loss_is_scaled_for_ga = False
    ours.train()
    ref = Plain(model=tiny_llama(), args=arguments(tmp_path / "ref", 8, **kw), train_dataset=data,
                data_collator=collate)
    ref.train()
    assert ours.logical_batch_optimizer.updates == 4
    assert torch.allclose(flat(ours.model), flat(ref.model), atol=1e-10, rtol=0)


def test_unequal_token_counts_with_per_micro_batch_means_warn(tmp_path):
    """A model that takes no loss kwargs averages each micro-batch over its own tokens: with sequences of 3-10
    tokens the window is a mean of means (4e-2 off the big batch). It warns, naming num_items_in_batch; the default
    Llama, which normalises over the window's tokens, does not."""
    def train(model):
        trainer = LogicalBatchTrainer(model=model, args=arguments(tmp_path, 2, num_train_epochs=1),
                                      train_dataset=dataset(16), data_collator=collate, logical_batch_size=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        return [str(w.message) for w in caught if "mean of means" in str(w.message)]

    no_kwargs = tiny_llama()
    no_kwargs.accepts_loss_kwargs = False
    got = train(no_kwargs)
    assert len(got) == 1 and "loss-bearing labels" in got[0] and "num_items_in_batch" in got[0]
    assert train(tiny_llama()) == []
