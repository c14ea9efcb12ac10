"""The MDM denoiser, the masked-diffusion ELBO and the sampler, against plain references written here."""
import copy
import math

import pytest
import torch

import sdebatch
from sdebatch.mdm.model import MDM, MDMConfig, CONFIGS, flops_per_token, param_count, param_groups
from sdebatch.mdm.objective import (MASK_ID, PAD_ID, Schedule, corrupt, elbo, mdm_loss, sample_draws,
                                    sample_times, subs_logits)
from sdebatch.mdm.sample import generate, guided_logits
from sdebatch.mdm.vocab import SPECIAL, TEXT, Vocab, layout_pair

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matrices run fastest on one thread


VOCAB = Vocab(text_size=8, image_codes=8, audio_codes=8)  # 37 ids
V = VOCAB.size


def small_config(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, seq_len=16, base_width=16, base_depth=2)
    base.update(kw)
    return MDMConfig(**base)


def text_row(ids, seq_len):
    """A text row as pack_text lays it out: [TEXT] then ids (already offset), every id a target."""
    toks = [VOCAB.id("[TEXT]")] + [VOCAB.text_offset + i for i in ids]
    assert len(toks) == seq_len
    return {"tokens": torch.tensor(toks), "pad": torch.ones(seq_len, dtype=torch.bool),
            "modality": torch.tensor([SPECIAL] + [TEXT] * (seq_len - 1)),
            "target": torch.tensor([False] + [True] * (seq_len - 1))}


def text_batch(n, seq_len, seed=0):
    """n text rows of random ids, built directly (fast for large n)."""
    g = torch.Generator().manual_seed(seed)
    rows = text_row([0] * (seq_len - 1), seq_len)
    batch = {k: v.expand(n, -1).clone() for k, v in rows.items()}
    batch["tokens"][:, 1:] = VOCAB.text_offset + torch.randint(0, 8, (n, seq_len - 1), generator=g)
    return batch


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in ("tokens", "pad", "modality", "target")}


def mixed_batch(n, seq_len=16, seed=0):
    """n rows alternating text, T2I and I2T pairs of random lengths (so padding and targets vary)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        kind = ("text", "t2i", "i2t")[i % 3]
        if kind == "text":
            rows.append(text_row(torch.randint(0, 8, (seq_len - 1,), generator=g).tolist(), seq_len))
        else:
            n_text, n_code = (int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g)))
            rows.append(layout_pair(VOCAB, kind, torch.randint(0, 8, (n_text,), generator=g).tolist(),
                                    torch.randint(0, 8, (n_code,), generator=g).tolist(), seq_len))
    return stack(rows)


class TableModel(torch.nn.Module):
    """A stub denoiser whose logits depend only on the position: a learnable (L, V) table."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, tokens, pad=None, *, select=None):
        logits = self.table.expand(tokens.shape[0], -1, -1)
        return logits if select is None else logits[select]


# --- schedules and the ELBO weight ---

@pytest.mark.parametrize("spec,alpha,w", [
    (Schedule("linear"), lambda t: 1 - t, lambda t: 1 / t),
    (Schedule("cosine"), lambda t: 1 - math.cos(math.pi / 2 * (1 - t)),
     lambda t: math.pi / 2 * math.tan(math.pi / 2 * (1 - t))),
    (Schedule("polynomial", power=3.0), lambda t: 1 - t ** 3, lambda t: 3 / t),
    (Schedule("loglinear", eps=1e-3), lambda t: 1 - (1 - 1e-3) * t, lambda t: 1 / t),
])
def test_schedule_alpha_and_weight(spec, alpha, w):
    for t in (0.05, 0.3, 0.7, 0.99):
        tt = torch.tensor(t)
        assert abs(float(spec.alpha(tt)) - alpha(t)) < 1e-12
        assert abs(float(spec.weight(tt)) - w(t)) < 1e-9 * w(t)
        h = 1e-6  # alpha' against a central difference
        fd = (alpha(t + h) - alpha(t - h)) / (2 * h)
        assert abs(float(spec.dalpha(tt)) - fd) < 1e-6
    assert abs(float(spec.alpha(torch.tensor(0.0))) - 1) < 1e-12


@pytest.mark.parametrize("schedules", ["linear", "cosine", {"image": "polynomial:3", "text": "cosine"}])
def test_loss_equals_hand_computation(schedules):
    """loss_sum = sum over masked target positions of w(t) * -log p(x0), p with [MASK]/[PAD] removed."""
    batch = stack([text_row([1, 2, 3, 4, 5, 6, 7], 8), layout_pair(VOCAB, "t2i", [3], [1, 2], 8)])
    g = torch.Generator().manual_seed(3)
    table = torch.randn(8, V, generator=g)
    t = torch.tensor([0.4, 0.8])
    u = torch.rand(2, 8, generator=g)
    out = mdm_loss(TableModel(table), batch, schedules=schedules, t=t, u=u, cond_drop=0.0)

    def schedule_of(row, i):
        if isinstance(schedules, str):
            return schedules
        generated = "text" if row == 0 else "image"  # structure tokens follow the content they delimit
        return schedules.get(generated, "linear")

    alpha = {"linear": lambda t: 1 - t, "cosine": lambda t: 1 - math.cos(math.pi / 2 * (1 - t)),
             "polynomial:3": lambda t: 1 - t ** 3}
    weight = {"linear": lambda t: 1 / t, "cosine": lambda t: math.pi / 2 * math.tan(math.pi / 2 * (1 - t)),
              "polynomial:3": lambda t: 3 / t}
    expect, n_items, n_masked = 0.0, 0, 0
    for b in range(2):
        for i in range(8):
            if not (batch["target"][b, i] and batch["pad"][b, i]):
                continue
            n_items += 1
            s = schedule_of(b, i)
            if float(u[b, i]) < 1 - alpha[s](float(t[b])):
                n_masked += 1
                row = table[i].tolist()
                allowed = [math.exp(v) for k, v in enumerate(row) if k not in (MASK_ID, PAD_ID)]
                nll = -(row[int(batch["tokens"][b, i])] - math.log(sum(allowed)))
                expect += weight[s](float(t[b])) * nll
    assert n_masked > 2
    assert int(out["num_items"]) == n_items and int(out["num_masked"]) == n_masked
    assert abs(out["loss_sum"].item() - expect) < 1e-10
    assert abs(float(out["elbo_bits"]) - expect / n_items / math.log(2)) < 1e-10
    assert abs(float(out["sum/text"] + out["sum/image"] + out["sum/audio"]) - expect) < 1e-10
    assert int(out["count/text"]) == 7 and int(out["count/image"]) == 4  # [BOI] 2 codes [EOI]


def test_elbo_of_uniform_model_is_log_vocab():
    """A model uniform over the V - 2 allowed ids has -ELBO = log2(V - 2) bits per token exactly in expectation:
    E_t[w(t) (1 - alpha(t))] integrates -alpha' over [0, 1] = 1 for every schedule."""
    batch = text_batch(64, 32)
    for s in ("linear", "cosine"):
        r = elbo(TableModel(torch.zeros(32, V)), batch, n_t=16, schedules=s, time_eps=1e-4)
        assert abs(r["bits_per_token"] / math.log2(V - 2) - 1) < 0.03
        assert abs(r["bits/text"] - r["bits_per_token"]) < 1e-9


# --- the forward process ---

@pytest.mark.parametrize("spec", ["linear", "cosine"])
def test_masked_fraction_matches_schedule(spec):
    batch = text_batch(2000, 32)
    for t0 in (0.2, 0.6):
        c = corrupt(batch, torch.full((2000,), t0), schedules=spec, generator=torch.Generator().manual_seed(1))
        n = int(c["items"].sum())
        frac = int(c["masked"].sum()) / n
        p = 1 - float(Schedule(spec).alpha(torch.tensor(t0)))
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_antithetic_times_cover_unit_interval():
    n, eps = 1000, 1e-3
    t = sample_times(n, method="antithetic", eps=eps, generator=torch.Generator().manual_seed(0))
    assert t.min() >= eps and t.max() <= 1
    u = (t - eps) / (1 - eps)
    counts = torch.bincount((u * n).floor().long().clamp(max=n - 1), minlength=n)
    assert bool((counts == 1).all())  # exactly one time in each of n equal strata
    gaps = torch.diff(u.sort().values)
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / n), atol=1e-12)


def test_per_sample_draws_do_not_depend_on_the_batch():
    """sample_draws keys every draw by (seed, position): any split of the stream into batches, in any order, gives
    the same draws (common random numbers across physical batch sizes), and another seed gives other draws."""
    pos = torch.arange(100, 132)
    t, u, d = sample_draws(pos, 16, seed=3)
    for b in (1, 4, 8):
        parts = [sample_draws(pos[i:i + b], 16, seed=3) for i in range(0, 32, b)]
        for whole, split in zip((t, u, d), zip(*parts)):
            assert torch.equal(whole, torch.cat(split))
    shuffled = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_draws(pos[shuffled], 16, seed=3)[1], u[shuffled])
    other = sample_draws(pos, 16, seed=4)
    assert not torch.equal(other[0], t) and not torch.equal(other[1], u)
    assert u.min() >= 0 and u.max() < 1 and d.min() >= 0 and d.max() < 1
    # the masking uniforms are uniform and independent across positions (a Kolmogorov-Smirnov bound, 4096 values)
    big = sample_draws(torch.arange(256), 16, seed=0)[1].flatten().sort().values
    ks = (big - torch.arange(1, big.numel() + 1) / big.numel()).abs().max()
    assert ks < 1.63 / math.sqrt(big.numel())  # the 1% critical value


@pytest.mark.parametrize("n", [4, 8, 16, 64, 256])
def test_per_sample_times_are_stratified_for_any_batch(n):
    """t_n = eps + (1 - eps) frac(u + n / phi): any n consecutive positions leave no gap over 3 / n in [0, 1)
    (three-gap theorem: the largest gap of the golden-ratio sequence is under phi^2 / n), as antithetic does."""
    eps = 1e-3
    for start in (0, 17, 10_000_019):
        t = sample_draws(torch.arange(start, start + n), 4, seed=1, time_eps=eps)[0].double()
        assert t.min() >= eps and t.max() <= 1
        v = ((t - eps) / (1 - eps)).sort().values
        gaps = torch.cat([torch.diff(v), (1 + v[:1] - v[-1:])])  # on the circle
        assert gaps.max() < 3 / n


def test_only_targets_masked_padding_never():
    batch = mixed_batch(9)
    real_target = batch["target"] & batch["pad"]
    c = corrupt(batch, torch.ones(9), cond_drop=0.0)  # t = 1: every target masked
    assert torch.equal(c["masked"], real_target)
    assert torch.equal(c["x_t"][~real_target], batch["tokens"][~real_target])  # condition, structure, padding
    assert bool((c["x_t"][~batch["pad"]] == PAD_ID).all())
    for t0 in (0.3, 0.9):  # at any t: never outside the real targets
        c = corrupt(batch, torch.full((9,), t0), cond_drop=0.5, generator=torch.Generator().manual_seed(2))
        assert not bool((c["masked"] & ~real_target).any())
        assert not bool(((c["x_t"] == MASK_ID) & ~batch["pad"]).any())


def test_condition_drop_masks_condition_content_only():
    batch = mixed_batch(9)
    c = corrupt(batch, torch.full((9,), 1e-3), cond_drop=1.0)  # t ~ 0: targets essentially clean
    cond = batch["pad"] & ~batch["target"] & (batch["modality"] != SPECIAL)
    assert torch.equal(c["dropped"], cond) and bool(cond.any())
    assert bool((c["x_t"][cond] == MASK_ID).all())
    structure = batch["pad"] & ~batch["target"] & (batch["modality"] == SPECIAL)
    assert torch.equal(c["x_t"][structure], batch["tokens"][structure])  # task and boundary tokens stay
    assert not bool((c["masked"] & cond).any())  # dropped condition is never in the loss
    rows = torch.arange(9) % 3 == 0  # text rows have no condition: nothing dropped
    assert not bool(c["dropped"][rows].any())


def test_subs_never_predicts_mask_or_pad():
    table = torch.zeros(8, V)
    table[:, MASK_ID] = table[:, PAD_ID] = 50.0  # the stub would love to predict them
    assert torch.isinf(subs_logits(table)[:, [MASK_ID, PAD_ID]]).all()
    batch = stack([text_row([1, 2, 3, 4, 5, 6, 7], 8)])
    out = mdm_loss(TableModel(table), batch, t=torch.tensor([0.9]), cond_drop=0.0)
    assert math.isfinite(out["loss_sum"].item())
    x = generate(TableModel(table), batch, steps=4, strategy="random", temperature=1.0, top_k=None, top_p=None,
                 guidance=1.0, block_size=None, schedule="linear")
    assert not bool(((x == MASK_ID) | (x == PAD_ID)).any())


# --- the sampler ---

def test_sampler_commits_each_target_once_and_keeps_condition():
    torch.manual_seed(0)
    model = MDM(small_config()).eval()
    batch = mixed_batch(6)
    gen = batch["target"] & batch["pad"]
    states = []
    x, at = generate(model, batch, steps=5, strategy="random", temperature=1.0, top_k=10, top_p=0.9, guidance=2.0,
                     block_size=3, schedule="cosine", generator=torch.Generator().manual_seed(0),
                     callback=lambda s, x: states.append((s, x.clone())), return_steps=True)
    assert not bool((x[gen] == MASK_ID).any())
    assert torch.equal(x[~gen], batch["tokens"][~gen])  # condition, structure tokens and padding untouched
    assert bool((at[gen] >= 0).all()) and bool((at[~gen] == -1).all())
    prev = batch["tokens"].masked_fill(gen, MASK_ID)
    for s, cur in states:  # each step commits exactly the positions recorded for it, and never revisits one
        changed = cur != prev
        assert torch.equal(changed, (at == s) & (cur != MASK_ID))
        assert not bool((changed & (prev != MASK_ID)).any())
        prev = cur
    assert torch.equal(prev, x)


def test_low_confidence_commits_most_confident_first():
    batch = stack([text_row([1, 2, 3, 4, 5, 6, 7], 8)])
    confidence = torch.tensor([0.0, 3.0, 7.0, 1.0, 5.0, 2.0, 6.0, 4.0])  # peak height per position
    table = torch.zeros(8, V)
    table[torch.arange(8), VOCAB.text_offset] = confidence
    _, at = generate(TableModel(table), batch, steps=7, strategy="low_confidence", temperature=0.0, top_k=None,
                     top_p=None, guidance=1.0, block_size=None, schedule="linear", return_steps=True)
    order = at[0, 1:].argsort()  # positions 1..7 by commit step
    assert torch.equal(order + 1, confidence[1:].argsort(descending=True) + 1)
    assert sorted(at[0, 1:].tolist()) == list(range(7))  # one per step


def test_guidance_formula():
    """logits = uncond + w (cond - uncond), the unconditional pass seeing the condition masked."""
    class CondModel(torch.nn.Module):
        def forward(self, tokens, pad=None, *, select=None):
            has_cond = (tokens[:, 2] != MASK_ID).to(torch.get_default_dtype())  # the caption's first token
            logits = torch.zeros(*tokens.shape, V)
            logits[..., 20] = 1.0 + 2.0 * has_cond[:, None]
            return logits[select]
    batch = stack([layout_pair(VOCAB, "t2i", [3], [1, 2], 8)])
    sel = batch["target"].clone()
    out = guided_logits(CondModel(), batch["tokens"], batch, sel, guidance=3.0)
    assert torch.allclose(out[:, 20], torch.full((4,), 1.0 + 3.0 * 2.0))


# --- the network ---

def test_attention_ignores_padding_and_is_bidirectional():
    torch.manual_seed(0)
    model = MDM(small_config()).eval()
    batch = mixed_batch(3)
    row = 1  # a t2i pair, padded
    pad = batch["pad"][row:row + 1]
    assert not bool(pad.all())
    tokens = batch["tokens"][row:row + 1]
    ref = model(tokens, pad)
    other = tokens.clone()
    other[~pad] = torch.randint(13, V, (int((~pad).sum()),))
    out = model(other, pad)
    assert torch.allclose(out[pad], ref[pad], atol=1e-12, rtol=0)
    last = int(pad.sum()) - 1
    changed = tokens.clone()
    changed[0, last] = VOCAB.image_offset + (int(tokens[0, last]) + 1) % 8
    assert (model(changed, pad)[0, 0] - ref[0, 0]).abs().max() > 1e-6  # the first position sees the last
    sel = model(tokens, pad, select=pad)
    assert torch.allclose(sel, ref[pad], atol=1e-12, rtol=0)


def test_accumulation_exact_through_logical_batch_optimizer():
    """Micro-batches with opt.backward(loss_sum, num_items) equal one big-batch step on sum / items, to 1e-10."""
    torch.manual_seed(0)
    ref = MDM(small_config())
    acc, naive, init = copy.deepcopy(ref), copy.deepcopy(ref), copy.deepcopy(ref)
    opt_naive = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(param_groups(naive, 1e-2, 0.1, eps=1e-8)), 8, 2)
    batch = mixed_batch(8)
    opt_ref = torch.optim.AdamW(param_groups(ref, 1e-2, 0.1, eps=1e-8))
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(param_groups(acc, 1e-2, 0.1, eps=1e-8)), 8, 2)
    assert opt.accumulation_steps == 4
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        t = sample_times(8, generator=g)
        u, drop_u = torch.rand(8, 16, generator=g), torch.rand(8, generator=g)
        out = mdm_loss(ref, batch, t=t, u=u, drop_u=drop_u, cond_drop=0.5)
        (out["loss_sum"] / out["num_items"]).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        for i in range(0, 8, 2):
            sl = slice(i, i + 2)
            sub = {k: v[sl] for k, v in batch.items()}
            o = mdm_loss(acc, sub, t=t[sl], u=u[sl], drop_u=drop_u[sl], cond_drop=0.5)
            opt.backward(o["loss_sum"], num_items=o["num_items"], num_samples=2)
            opt.step()
            opt.zero_grad()
            o = mdm_loss(naive, sub, t=t[sl], u=u[sl], drop_u=drop_u[sl], cond_drop=0.5)
            (o["loss_sum"] / o["num_items"]).backward()  # mean of per-micro-batch means: the bug
            opt_naive.step()
            opt_naive.zero_grad()
    assert opt.clock.updates == 3
    for (name, a), b in zip(acc.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), name
    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])
    assert (flat(ref) - flat(init)).abs().max() > 1e-3  # it did move
    assert (flat(naive) - flat(ref)).abs().max() > 1e-6  # and the oracle can tell the mean-of-means bug apart


def test_overfits_a_few_sequences():
    torch.manual_seed(0)
    model = MDM(small_config(d_model=64, base_width=64))
    batch = mixed_batch(6)
    before = elbo(model, batch, n_t=8)["bits_per_token"]
    opt = torch.optim.AdamW(param_groups(model, 1e-2, 0.0))
    for _ in range(120):
        out = mdm_loss(model, batch)
        (out["loss_sum"] / out["num_items"]).backward()
        opt.step()
        opt.zero_grad()
    after = elbo(model, batch, n_t=8)["bits_per_token"]
    assert after < 0.5 * before, (before, after)


# --- counting and the parameterization ---

@pytest.mark.parametrize("tie", [False, True])
def test_param_count_by_hand(tie):
    c = small_config(tie_embeddings=tie)  # d 32, 2 layers, 2 heads of 16, d_ff = 64 * ceil(85.3 / 64) = 128
    assert c.d_ff == 128
    d, f, hd, L = 32, 128, 16, 2
    block = (d * 3 * d) + (d * d) + (d * 2 * f) + (f * d) + d + d + hd + hd
    emb = V * d * (1 if tie else 2)
    expect = {"embedding": emb, "non_embedding": L * block + d, "total": emb + L * block + d}
    assert param_count(c) == expect
    assert sum(p.numel() for p in MDM(c).parameters()) == expect["total"]
    assert flops_per_token(c) == 6 * (L * block + d + V * d) + 12 * L * d * c.seq_len


def test_param_groups_lr_multipliers():
    model = MDM(small_config())  # d_model 32 = 2 x base_width
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 0.1, eps=1e-8)}
    assert abs(groups["hidden"]["lr"] - 1e-3 * 16 / 32) < 1e-18
    assert abs(groups["hidden"]["weight_decay"] - 0.1 * 2) < 1e-15  # lr x wd independent of width
    assert groups["embedding"]["lr"] == 1e-3 and groups["embedding"]["weight_decay"] == 0.0
    assert groups["norm"]["lr"] == 1e-3 and groups["norm"]["weight_decay"] == 0.0
    assert abs(groups["hidden"]["eps"] - 1e-8 / (2 * 1)) < 1e-22
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    hidden = {id(p) for p in groups["hidden"]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in hidden) == (name.startswith("blocks.") and p.dim() == 2), name
    std = model.blocks[0].mlp.down.weight.std().item()  # CompleteP init: init_std / sqrt(m)
    assert abs(std / (0.02 / math.sqrt(2)) - 1) < 0.15


def test_named_configs():
    sizes = {n: param_count(c) for n, c in CONFIGS.items()}
    assert 300e6 < sizes["320m"]["total"] < 340e6 and 230e6 < sizes["320m"]["embedding"] < 250e6
    assert 2.8e9 < sizes["3b"]["total"] < 3.2e9
    assert CONFIGS["tiny"].width_mult == 1 and CONFIGS["tiny"].depth_mult == 1
    assert CONFIGS["micro"].width_mult == 0.5 and CONFIGS["micro"].depth_mult == 0.5


def test_probe_positions_give_independent_times_consecutive_ones_do_not():
    """The noise probe keys its draws by scattered positions: the mean time of 4 of them varies like that of 4 i.i.d.
    uniforms (1 / 48), while 4 consecutive positions are stratified (their mean varies 2-3x less)."""
    from sdebatch.mdm.train import probe_positions

    def var_of_group_means(pos):
        t = sample_draws(pos, 2, seed=0, time_eps=0.0)[0].double()
        return float(t.reshape(-1, 4).mean(1).var())

    scattered = var_of_group_means(probe_positions(4096, seed=0))
    assert abs(scattered - 1 / 48) < 0.2 / 48
    assert var_of_group_means(torch.arange(4096)) < 0.6 / 48  # 0.42 / 48 measured
    assert not torch.equal(probe_positions(8, seed=0), probe_positions(8, seed=1))


def test_elbo_standard_error_against_closed_form():
    """A model uniform over the V - 2 allowed ids, linear schedule, one time per row and replicate: a row's estimate
    is c M / t with c = ln(V - 2), M ~ Bin(L, t) its masked targets, so E = c L whatever t and the variance is
    c^2 L E[(1 - t) / t] = c^2 L (-ln eps - (1 - eps)) / (1 - eps) for t uniform on [eps, 1]. The standard error the
    replicates give must match sqrt(N var) / (N L) / ln 2, and the rows must add up to the estimate."""
    from sdebatch.mdm.objective import elbo_standard_error

    n, seq_len, eps = 4000, 9, 0.05
    batch = text_batch(n, seq_len)
    r = elbo(TableModel(torch.zeros(seq_len, V)), batch, n_t=1, replicates=2, time_eps=eps, seed=3)
    L, c = seq_len - 1, math.log(V - 2)
    assert r["row_nats"].shape == (2, n) and int(r["row_items"].sum()) == r["num_items"] == n * L
    assert abs(float(r["row_nats"].mean(0).sum()) - r["nats_sum"]) < 1e-6 * r["nats_sum"]
    var_row = c ** 2 * L * (-math.log(eps) - (1 - eps)) / (1 - eps)
    expect = math.sqrt(n * var_row / 2) / (n * L) / math.log(2)  # the mean of 2 replicates per row
    se = elbo_standard_error(r["row_nats"], r["num_items"])
    assert abs(se / expect - 1) < 0.1, (se, expect)
    # and the estimate sits within a few of its standard errors of the exact value log2(V - 2)
    assert abs(r["bits_per_token"] - math.log2(V - 2)) < 4 * expect
    # identical models under the same draws: a paired difference with no estimator error
    assert elbo_standard_error(r["row_nats"] - r["row_nats"], r["num_items"]) == 0.0
    with pytest.raises(ValueError, match="replicates >= 2"):
        elbo_standard_error(r["row_nats"][:1], r["num_items"])
    with pytest.raises(ValueError, match="replicates must be an int >= 1"):
        elbo(TableModel(torch.zeros(seq_len, V)), batch, replicates=0)


def test_elbo_replicate_one_keeps_the_old_draws():
    """replicates=1 draws exactly what the single-replicate estimator drew (numbers of earlier runs stay valid)."""
    batch = mixed_batch(6)
    model = MDM(small_config())
    a = elbo(model, batch, n_t=4, seed=5)
    b = elbo(model, batch, n_t=4, replicates=1, seed=5)
    assert a["bits_per_token"] == b["bits_per_token"] and b["row_nats"].shape == (1, 6)
