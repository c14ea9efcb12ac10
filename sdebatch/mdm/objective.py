"""The continuous-time masked (absorbing-state) diffusion ELBO, in the conventions of MDLM (Sahoo et al. 2024) and
MD4 (Shi et al. 2024).

Forward process: at time t in [0, 1] each loss-bearing position keeps its token with probability alpha(t) and is
replaced by [MASK] otherwise, independently. The negative ELBO of a sequence is

    E_t [ sum over masked positions i of  w_i(t) * (-log p_theta(x0_i | x_t)) ],   w(t) = -alpha'(t) / (1 - alpha(t)),

with p_theta under the SUBS parameterization: [MASK] and [PAD] get probability 0, and unmasked positions are copied
(they carry no loss). Each position may follow its own schedule (MD4's generalised masked diffusion): positions use
the schedule of their modality, and the structure tokens of a target segment ([BOI] ... [EOI], [BOT]/[EOT]) use the
schedule of the content they delimit, taken as the row's majority target modality.

The loss is returned as a SUM with a fixed denominator, the number of real target positions (not the random number
of masked ones), so ``opt.backward(loss_sum, num_items=num_items)`` over micro-batches equals one big batch exactly.

Conditional tasks mask only ``target`` positions: the condition stays clean. With probability ``cond_drop`` per row
the condition's content tokens (not its structure tokens, which tell the model the layout) are replaced by [MASK]
instead of a dedicated null token, so the unconditional pass of classifier-free guidance uses the same input
convention; those positions are never in the loss. Padding is never masked and never in the loss.

Known approximations, as in MDLM: t is drawn from [time_eps, 1] (avoids the 1/t blow-up of w at t = 0), and the prior
term at t = 1 is dropped (exactly 0 when alpha(1) = 0; "loglinear" has alpha(1) = its eps, so it is of order eps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Union

import torch
import torch.nn.functional as F

from .seeding import derive_seed
from .vocab import AUDIO, IMAGE, SPECIAL, SPECIALS, TEXT

PAD_ID = SPECIALS.index("[PAD]")
MASK_ID = SPECIALS.index("[MASK]")
MODALITY_NAMES = {"special": SPECIAL, "text": TEXT, "image": IMAGE, "audio": AUDIO}
KINDS = ("linear", "cosine", "polynomial", "loglinear")


@dataclass(frozen=True)
class Schedule:
    """A masking schedule alpha(t) (probability a token is still clean at time t), alpha(0) = 1, decreasing.

    Args:
        kind: "linear" alpha = 1 - t (w = 1/t);
            "cosine" alpha = 1 - cos(pi/2 (1 - t)), MD4's cosine (w = pi/2 tan(pi/2 (1 - t)));
            "polynomial" alpha = 1 - t^power (w = power / t);
            "loglinear" MDLM's log-linear noise: sigma(t) = -log(1 - (1 - eps) t), alpha = exp(-sigma) = 1 - (1-eps) t
            (w = 1/t; alpha(1) = eps, so the prior term it leaves out is of order eps).
        power: exponent of "polynomial" (default 2.0).
        eps: eps of "loglinear" (default 1e-3).
    """

    kind: str = "linear"
    power: float = 2.0
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {KINDS}, got {self.kind!r}")
        if not self.power > 0 or not 0 <= self.eps < 1:
            raise ValueError(f"need power > 0 and 0 <= eps < 1, got power={self.power}, eps={self.eps}")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return 1 - t
        if self.kind == "cosine":
            return 1 - torch.cos(math.pi / 2 * (1 - t))
        if self.kind == "polynomial":
            return 1 - t ** self.power
        return 1 - (1 - self.eps) * t

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt."""
        if self.kind == "linear":
            return -torch.ones_like(t)
        if self.kind == "cosine":
            return -math.pi / 2 * torch.sin(math.pi / 2 * (1 - t))
        if self.kind == "polynomial":
            return -self.power * t ** (self.power - 1)
        return torch.full_like(t, -(1 - self.eps))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = -alpha'(t) / (1 - alpha(t)), the ELBO weight of a masked position."""
        return -self.dalpha(t) / (1 - self.alpha(t))


ScheduleSpec = Union[str, Schedule, Mapping]


def parse_schedule(spec: str | Schedule) -> Schedule:
    """A Schedule, or a string "linear", "cosine", "loglinear", "polynomial" or "polynomial:<power>"."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        kind, _, arg = spec.partition(":")
        return Schedule(kind, power=float(arg)) if arg else Schedule(kind)
    raise TypeError(f"a schedule is a Schedule or a string, got {spec!r}")


def resolve_schedules(schedules: ScheduleSpec = "linear") -> dict[int, Schedule]:
    """One schedule per modality id. ``schedules`` is one schedule for all, or a dict keyed by modality name ("text",
    "image", "audio", "special") or id; missing modalities take the dict's "default" entry (itself default linear)."""
    if not isinstance(schedules, Mapping):
        s = parse_schedule(schedules)
        return {m: s for m in MODALITY_NAMES.values()}
    default = parse_schedule(schedules.get("default", "linear"))
    out = {m: default for m in MODALITY_NAMES.values()}
    for key, spec in schedules.items():
        if key == "default":
            continue
        m = MODALITY_NAMES.get(key, key)
        if m not in out:
            raise ValueError(f"schedule keys are {sorted(MODALITY_NAMES)}, 'default' or modality ids; got {key!r}")
        out[m] = parse_schedule(spec)
    return out


def sample_times(n: int, *, method: str = "antithetic", eps: float = 1e-3, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """n diffusion times in [eps, 1].

    Args:
        n: how many (one per row).
        method: "uniform" (i.i.d.) or "antithetic" (stratified: u_i = (u + i/n) mod 1 with one shared u, so the batch
            covers [0, 1] evenly and the loss has lower variance). Default "antithetic".
        eps: floor; t = eps + (1 - eps) u. Default 1e-3 (MDLM's sampling_eps).
        generator: torch random generator. Default: the global one.
    """
    if method not in ("uniform", "antithetic"):
        raise ValueError(f"method must be 'uniform' or 'antithetic', got {method!r}")
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    dtype = dtype or torch.get_default_dtype()
    if method == "uniform":
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
    else:
        u0 = torch.rand(1, generator=generator, device=device, dtype=dtype)
        u = (u0 + torch.arange(n, device=device, dtype=dtype) / n) % 1
    return eps + (1 - eps) * u


_INV_PHI = (math.sqrt(5) - 1) / 2  # n / phi mod 1 spreads any run of consecutive n evenly over [0, 1)


def sample_draws(positions: torch.Tensor, length: int, *, seed: int = 0, time_eps: float = 1e-3,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's training randomness as a function of (seed, its stream position) alone.

    A sample gets the same time, mask and condition drop whatever batch it lands in, so runs at different physical
    batch sizes (accumulation or one big batch, one rank or many) see the same stream of (sequence, t, mask): common
    random numbers, which is what lets a batch-size sweep compare runs at a fraction of the seed-to-seed noise.
    Times follow the additive recurrence t_n = eps + (1 - eps) frac(u_seed + n / phi), a low-discrepancy sequence:
    every stretch of consecutive positions is spread evenly over [eps, 1], as antithetic sampling spreads a batch.
    So samples at consecutive positions are not independent: the gradient noise of b of them shrinks faster than
    1/b in its time component, as it does under antithetic sampling, and estimators that assume i.i.d. samples (the
    two-size noise scale) see that stratified noise; key draws by scattered positions where independence matters.

    Args:
        positions: (B,) integer stream positions (``position`` of a batch from :class:`MixtureSampler`).
        length: sequence length L.
        seed: run seed (default 0).
        time_eps: floor of t (default 1e-3).
        dtype: float dtype of the draws (default torch's default dtype; float32 at least).
    Returns ``t`` (B,), ``u`` (B, L) masking uniforms, ``drop_u`` (B,) condition-drop uniforms, on ``positions``'
    device.
    """
    # at least float32: in bf16 about 0.2% of the uniforms would round to 1.0 (never masked)
    dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
    pos = [int(p) for p in positions.reshape(-1).tolist()]
    if any(p < 0 for p in pos):
        raise ValueError(f"positions must be non-negative stream positions, got {min(pos)}")
    u0 = torch.rand(1, generator=torch.Generator().manual_seed(derive_seed(seed, 2)), dtype=torch.float64)
    frac = (u0 + torch.tensor(pos, dtype=torch.float64) * _INV_PHI) % 1  # float64: exact enough for n ~ 1e12
    t = time_eps + (1 - time_eps) * frac
    draws = torch.stack([torch.rand(length + 1, generator=torch.Generator().manual_seed(derive_seed(seed, 3, p)),
                                    dtype=torch.float64) for p in pos]) if pos else torch.zeros(0, length + 1)
    dev = positions.device
    return t.to(dev, dtype), draws[:, :length].to(dev, dtype), draws[:, length].to(dev, dtype)


def target_modality(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B,) the modality each row generates: the majority modality of its real target content (TEXT if none)."""
    mod, target = batch["modality"], batch["target"] & batch["pad"]
    counts = torch.stack([((mod == m) & target).sum(-1) for m in (TEXT, IMAGE, AUDIO)], dim=-1)
    return torch.tensor([TEXT, IMAGE, AUDIO], device=mod.device)[counts.argmax(-1)]


def schedule_modality(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) modality id whose schedule each position follows: its own modality, or for structure (SPECIAL)
    positions the row's target modality (:func:`target_modality`)."""
    mod = batch["modality"]
    return torch.where(mod == SPECIAL, target_modality(batch)[:, None], mod)


def position_alpha_weight(sid: torch.Tensor, t: torch.Tensor, schedules: dict[int, Schedule]):
    """alpha and w per position (B, L), each position with its modality's schedule at its row's t."""
    alpha = torch.ones(sid.shape, dtype=t.dtype, device=t.device)
    weight = torch.zeros(sid.shape, dtype=t.dtype, device=t.device)
    for m, s in schedules.items():
        sel = sid == m
        alpha = torch.where(sel, s.alpha(t)[:, None], alpha)
        weight = torch.where(sel, s.weight(t)[:, None], weight)
    return alpha, weight


def condition_positions(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) bool: the condition's content tokens (real, not target, not structure), what guidance drops."""
    return batch["pad"] & ~batch["target"] & (batch["modality"] != SPECIAL)


def drop_condition(tokens: torch.Tensor, batch: Mapping[str, torch.Tensor],
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """``tokens`` with the condition content replaced by [MASK] (in ``rows`` (B,) bool, default all rows)."""
    cond = condition_positions(batch)
    if rows is not None:
        cond = cond & rows[:, None]
    return tokens.masked_fill(cond, MASK_ID)


def subs_logits(logits: torch.Tensor) -> torch.Tensor:
    """SUBS: the model never predicts [MASK] or [PAD] (their logits -> -inf); logits in at least float32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    banned = torch.tensor([MASK_ID, PAD_ID], device=logits.device)
    return logits.index_fill(-1, banned, float("-inf"))


def corrupt(batch: Mapping[str, torch.Tensor], t: torch.Tensor, *, schedules: ScheduleSpec = "linear",
            cond_drop: float = 0.0, u: torch.Tensor | None = None, drop_u: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Draw x_t. Returns ``x_t``, ``masked`` (loss-bearing masked positions), ``dropped`` (condition positions
    masked for guidance), ``weight`` (w per position), ``alpha``, ``sid`` (schedule modality), ``items`` (real
    target positions).

    Args:
        batch: ``tokens``, ``pad``, ``modality``, ``target`` (B, L).
        t: (B,) times in (0, 1].
        schedules: one schedule or a dict per modality (see :func:`resolve_schedules`). Default "linear".
        cond_drop: probability per row of masking the condition (classifier-free guidance training). Default 0.
        u: (B, L) uniforms in [0, 1): position masked iff u < 1 - alpha. Default: drawn from ``generator``.
        drop_u: (B,) uniforms: row's condition dropped iff drop_u < cond_drop. Default: drawn from ``generator``.
    """
    tokens, pad, target = batch["tokens"], batch["pad"], batch["target"]
    if not 0.0 <= cond_drop <= 1.0:
        raise ValueError(f"cond_drop must be in [0, 1], got {cond_drop}")
    items = target & pad
    sid = schedule_modality(batch)
    alpha, weight = position_alpha_weight(sid, t, resolve_schedules(schedules))
    if u is None:
        u = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=t.dtype)
    masked = items & (u < 1 - alpha)
    if cond_drop > 0:
        if drop_u is None:
            drop_u = torch.rand(tokens.shape[0], generator=generator, device=tokens.device, dtype=t.dtype)
        dropped = condition_positions(batch) & (drop_u < cond_drop)[:, None]
    else:
        dropped = torch.zeros_like(masked)
    x_t = tokens.masked_fill(masked | dropped, MASK_ID)
    return {"x_t": x_t, "masked": masked, "dropped": dropped, "weight": weight, "alpha": alpha, "sid": sid,
            "items": items}


def mdm_loss(model, batch: Mapping[str, torch.Tensor], *, schedules: ScheduleSpec = "linear",
             time_sampling: str = "antithetic", time_eps: float = 1e-3, cond_drop: float = 0.1,
             t: torch.Tensor | None = None, u: torch.Tensor | None = None, drop_u: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> dict:
    """One Monte Carlo estimate of the negative ELBO of a batch, as a sum (nats) and its fixed denominator.

    Args:
        model: called as ``model(x_t, pad=pad, select=masked)`` -> logits (n_masked, V).
        batch: ``tokens``, ``pad``, ``modality``, ``target`` (B, L), as laid out by :mod:`sdebatch.mdm.vocab`.
        schedules: schedule, or dict per modality. Default "linear".
        time_sampling: "antithetic" (default) or "uniform", see :func:`sample_times`.
        time_eps: floor of t (default 1e-3).
        cond_drop: per-row probability of masking the condition (default 0.1; 0 for evaluation).
        t, u, drop_u: pre-drawn randomness ((B,), (B, L), (B,)); what is not given is drawn from ``generator``.
            Passing them makes a micro-batch draw identical to the same rows of a big-batch draw.

    Returns a dict: ``loss_sum`` (scalar, differentiable, nats), ``num_items`` (real target positions, int64
    tensor), ``elbo_bits`` (loss_sum / num_items / ln 2, detached: bits per token), ``num_masked``, ``row_sum`` (B,
    detached: each row's share of loss_sum), and per modality
    (text, image, audio) ``sum/<name>`` and ``count/<name>`` (detached) for logging; ``t`` used.
    """
    tokens, pad = batch["tokens"], batch["pad"]
    dtype = torch.get_default_dtype()
    if t is None:
        t = sample_times(tokens.shape[0], method=time_sampling, eps=time_eps, generator=generator,
                         device=tokens.device, dtype=dtype)
    c = corrupt(batch, t, schedules=schedules, cond_drop=cond_drop, u=u, drop_u=drop_u, generator=generator)
    masked = c["masked"]
    logits = subs_logits(model(c["x_t"], pad=pad, select=masked))
    nll = F.cross_entropy(logits, tokens[masked], reduction="none")
    per_pos = c["weight"][masked].to(nll.dtype) * nll
    loss_sum = per_pos.sum()
    num_items = c["items"].sum()
    row = masked.nonzero()[:, 0]  # the row of each masked position, in the order of per_pos
    out = {"loss_sum": loss_sum, "num_items": num_items, "num_masked": masked.sum(), "t": t,
           "elbo_bits": loss_sum.detach() / num_items.clamp(min=1) / math.log(2),
           "row_sum": torch.zeros(tokens.shape[0], dtype=per_pos.dtype, device=per_pos.device).index_add_(
               0, row, per_pos.detach())}
    sid_masked = c["sid"][masked]
    for name in ("text", "image", "audio"):
        m = MODALITY_NAMES[name]
        out[f"sum/{name}"] = per_pos.detach()[sid_masked == m].sum()
        out[f"count/{name}"] = (c["items"] & (c["sid"] == m)).sum()
    return out


@torch.no_grad()
def elbo(model, batch: Mapping[str, torch.Tensor], *, n_t: int = 8, replicates: int = 1,
         schedules: ScheduleSpec = "linear", time_eps: float = 1e-3, generator: torch.Generator | None = None,
         seed: int = 0) -> dict:
    """Evaluate the negative ELBO in bits per target token, averaging ``n_t`` draws of t per row and replicate
    (stratified per row: t_k = (u + k / n_t) mod 1, floored at time_eps, with u independent per row and replicate)
    and of the masks; no condition drop.

    Args:
        n_t: time samples per row and replicate (default 8).
        replicates: independent stratified sets of ``n_t`` times per row (default 1). With 2 or more, the spread
            between a row's replicates measures the estimator's own Monte Carlo error (:func:`elbo_standard_error`);
            stratified draws within one replicate are not independent, so they cannot.
        generator: random generator; default a fresh one seeded with ``seed`` (default 0) so evaluations repeat.

    Returns ``bits_per_token``, ``nats_sum`` (mean over draws), ``num_items``, ``bits/<modality>`` for the
    modalities present, and per row: ``row_nats`` (replicates, B) each replicate's estimate of the row's negative
    ELBO in nats, ``row_items`` (B,) its target positions, ``row_modality`` (B,) its target modality id.
    """
    if isinstance(n_t, bool) or not isinstance(n_t, int) or n_t < 1:
        raise ValueError(f"n_t must be an int >= 1, got {n_t!r}")
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"replicates must be an int >= 1, got {replicates!r}")
    tokens = batch["tokens"]
    if generator is None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    dtype = torch.get_default_dtype()
    row_nats = torch.zeros(replicates, tokens.shape[0], dtype=torch.float64)
    mod_sum = {name: 0.0 for name in ("text", "image", "audio")}
    for rep in range(replicates):
        u0 = torch.rand(tokens.shape[0], generator=generator, device=tokens.device, dtype=dtype)
        for k in range(n_t):
            t = time_eps + (1 - time_eps) * ((u0 + k / n_t) % 1)
            r = mdm_loss(model, batch, schedules=schedules, cond_drop=0.0, t=t, generator=generator)
            row_nats[rep] += r["row_sum"].double().cpu() / n_t
            for name in mod_sum:
                mod_sum[name] += float(r[f"sum/{name}"]) / (n_t * replicates)
    total = float(row_nats.mean(0).sum())
    items = int(r["num_items"])
    out = {"bits_per_token": total / max(items, 1) / math.log(2), "nats_sum": total, "num_items": items,
           "row_nats": row_nats, "row_items": (batch["target"] & batch["pad"]).sum(-1).cpu(),
           "row_modality": target_modality(batch).cpu()}
    for name, s in mod_sum.items():
        count = int(r[f"count/{name}"])
        if count:
            out[f"bits/{name}"] = s / count / math.log(2)
            out[f"count/{name}"] = count
    return out


def elbo_standard_error(row_nats: torch.Tensor, items: float) -> float:
    """Standard error, in bits per token, of the ELBO estimate sum_i mean_r row_nats[r, i] / items / ln 2 that comes
    from the draws of t and masks alone (the model and the held-out rows fixed).

    Rows are drawn independently and the ``R`` replicates of a row are i.i.d., so the estimator's variance is
    sum_i Var(row i) / R / items^2, with Var(row i) estimated without bias by the sample variance over its
    replicates. Pass the difference of two models' ``row_nats`` under the same draws for the error of a paired
    difference (common draws cancel most of it).

    Args:
        row_nats: (R, N) per replicate and row, nats (R >= 2).
        items: the denominator (target positions of the N rows).
    """
    if row_nats.dim() != 2 or row_nats.shape[0] < 2:
        raise ValueError(f"row_nats must be (replicates >= 2, rows), got shape {tuple(row_nats.shape)}")
    if not items > 0:
        raise ValueError(f"items must be positive, got {items!r}")
    var_of_mean = row_nats.double().var(dim=0, unbiased=True) / row_nats.shape[0]
    return math.sqrt(float(var_of_mean.sum())) / items / math.log(2)
