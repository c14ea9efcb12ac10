"""The denoiser of the tri-modal masked diffusion model: a bidirectional pre-norm transformer.

Architecture: token embedding -> n_layers x [RMSNorm -> attention (RoPE, QK-norm, no causal mask, padded keys masked
out, ``scaled_dot_product_attention``) -> residual; RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> logits over the
whole joint vocabulary (tied to the input embedding or untied, ``tie_embeddings``). There is no time input: under the
SUBS parameterization (see :mod:`sdebatch.mdm.objective`) the optimal denoiser does not need t (MDLM, MD4).

Call protocol, shared with the loss and the sampler: ``model(tokens, pad=pad, select=select)``; ``pad`` (B, L) bool is
True on real positions; ``select`` (B, L) bool, when given, returns logits only at those positions, shape (n, V).
At a 150k joint vocabulary the full (B, L, V) logits dominate memory, and the loss needs them only at masked positions.

Parameterization: CompleteP (Dey et al. 2025, arXiv 2505.01618), following its reference implementation
(EleutherAI/nanoGPT-mup, branch ``completep``). With width multiplier m = d_model / base_width and depth multiplier
m_L = n_layers / base_depth, and hyperparameters (init_std, lr, weight decay, Adam eps) tuned at the base shape:

    hidden matrices (qkv, attention out, MLP)  init std init_std / sqrt(m); Adam lr  base_lr / m;
                                               decoupled weight decay  wd * m (so lr x wd, the decay per step, is
                                               width-independent); eps  eps / (m * m_L)
    residual branches                          h <- h + m_L^(-alpha) * F(norm(h)), alpha = 1 (CompleteP)
    embedding, output head                     init std init_std; lr base_lr; eps  eps / m
    RMSNorm gains                              lr base_lr (the depth correction m_L^(alpha - 1) is 1 at alpha = 1)
    output logits                              multiplied by output_mult / m

Differences from that reference, on purpose: no weight decay on embeddings, the output head, or norm gains (they
decay embeddings); RMSNorm without biases; the attention scale stays 1/sqrt(head_dim) (muP's 1/head_dim matters
when width grows by widening heads; the named configs widen by adding heads at a fixed head_dim of 64, where the two
differ by a constant that the QK-norm gains absorb); QK-norm and RoPE are additions of this model. Whether
hyperparameters transfer for this workload is a claim to measure, not something the formulas guarantee.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# The joint vocabulary the named configs assume until the data's Vocab fills in the real one: a 128k text tokenizer,
# a 16k image codebook, an 8k audio codebook and the 13 special tokens of sdebatch.mdm.vocab (155,661 ids).
ASSUMED_VOCAB_SIZE = 13 + 131072 + 16384 + 8192


@dataclass(frozen=True)
class MDMConfig:
    """Shape and parameterization of the denoiser.

    Args:
        vocab_size: joint vocabulary size (ids), from ``Vocab.size`` at run time. Default ASSUMED_VOCAB_SIZE.
        d_model: residual width (features). Default 128.
        n_layers: transformer blocks. Default 4.
        n_heads: attention heads; head_dim = d_model / n_heads. Default 2.
        mlp_ratio: SwiGLU hidden width / d_model before rounding; 8/3 matches the parameters of a 4x GELU MLP.
        mlp_multiple: the SwiGLU hidden width is rounded up to a multiple of this (features). Default 64.
        seq_len: sequence length (tokens); used for the FLOP count, not a limit of RoPE. Default 128.
        tie_embeddings: share the input embedding and the output head. Default False.
        base_width: d_model of the base model the hyperparameters are tuned on (features). Default 128.
        base_depth: n_layers of that base model. Default 4.
        depth_alpha: residual branches are scaled by (base_depth / n_layers)^depth_alpha; 1 is CompleteP, 0.5 the
            depth-muP of Yang et al., 0 standard. Default 1.0.
        init_std: base initialisation std (unitless). Default 0.02.
        input_mult: multiplier on the embedding output (muP alpha_input, tunable at the base). Default 1.0.
        output_mult: multiplier on the logits before the 1/m width factor (muP alpha_output). Default 1.0.
        rope_base: RoPE frequency base. Default 10000.
        norm_eps: RMSNorm epsilon. Default 1e-6.
        compile: ``torch.compile`` the model in :func:`build_model` when it is placed on CUDA. Default False.
        autocast_dtype: "bfloat16", "float16" or None: autocast dtype of the forward on CUDA (never on CPU).
            Default "bfloat16".
    """

    vocab_size: int = ASSUMED_VOCAB_SIZE
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 2
    mlp_ratio: float = 8 / 3
    mlp_multiple: int = 64
    seq_len: int = 128
    tie_embeddings: bool = False
    base_width: int = 128
    base_depth: int = 4
    depth_alpha: float = 1.0
    init_std: float = 0.02
    input_mult: float = 1.0
    output_mult: float = 1.0
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    compile: bool = False
    autocast_dtype: str | None = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_multiple", "seq_len", "base_width",
                     "base_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size "
                             "(RoPE rotates pairs of features)")
        for name in ("mlp_ratio", "init_std", "rope_base", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be 'bfloat16', 'float16' or None, got {self.autocast_dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_ff(self) -> int:
        """SwiGLU hidden width: mlp_ratio * d_model rounded up to mlp_multiple."""
        return self.mlp_multiple * math.ceil(self.mlp_ratio * self.d_model / self.mlp_multiple)

    @property
    def width_mult(self) -> float:
        """m = d_model / base_width."""
        return self.d_model / self.base_width

    @property
    def depth_mult(self) -> float:
        """m_L = n_layers / base_depth."""
        return self.n_layers / self.base_depth

    @property
    def residual_scale(self) -> float:
        """m_L^(-depth_alpha): the multiplier on every residual branch."""
        return self.depth_mult ** (-self.depth_alpha)


# Named shapes. Widths grow by adding 64-wide heads. "tiny" is the base shape (m = m_L = 1) and trains on a 2-core CPU;
# "micro" (m = m_L = 1/2, ~3x the tokens/s of tiny) is for batch-size sweeps that need thousands of updates per run on
# a CPU (the default demo);
# "320m" is the paper's batch-study pilot (~240M of its ~324M parameters are the untied embeddings of the assumed
# 155,661-id joint vocabulary); "3b" is the paper's largest size. Fill vocab_size from the data with
# get_config(name, vocab.size).
CONFIGS: dict[str, MDMConfig] = {
    "micro": MDMConfig(d_model=64, n_layers=2, n_heads=1, seq_len=128),
    "tiny": MDMConfig(d_model=128, n_layers=4, n_heads=2, seq_len=128),
    "small": MDMConfig(d_model=384, n_layers=8, n_heads=6, seq_len=256),
    "320m": MDMConfig(d_model=768, n_layers=12, n_heads=12, seq_len=1024),
    "3b": MDMConfig(d_model=2560, n_layers=28, n_heads=40, seq_len=2048),
}


def get_config(name: str, vocab_size: int | None = None, **overrides) -> MDMConfig:
    """A named config with the vocabulary size of the data (``Vocab.size``) and any field overridden."""
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {name!r}")
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return replace(CONFIGS[name], **overrides)


def train_model_config(config: Mapping[str, Any], vocab_size: int) -> MDMConfig:
    """The model of a training config (:class:`sdebatch.mdm.config.TrainConfig`: its ``model`` and
    ``model_overrides``) for a vocabulary of ``vocab_size``: what ``sdebatch train`` builds and a checkpoint holds."""
    return get_config(config["model"], vocab_size, **config.get("model_overrides", {}))


class RMSNorm(nn.Module):
    """x / rms(x) * gain, with a learnable per-feature gain (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm"):  # fused on recent torch
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(length: int, head_dim: int, base: float, device: torch.device, dtype: torch.dtype):
    """cos and sin tables (length, head_dim) for rotate-half RoPE; computed in at least float32 for accuracy."""
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=work) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=work), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, D) by the position tables (L, D); done in the tables' precision, returned in x's dtype."""
    xf = x.to(cos.dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Bidirectional multi-head attention with RoPE and QK-norm (RMSNorm of q and k per head)."""

    def __init__(self, c: MDMConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = c.n_heads, c.head_dim
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.out = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # QK-norm bounds the attention logits, which keeps large-width / low-precision training stable.
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        # No causal mask: every position sees every real position. key_mask (B, 1, 1, L) is True where attending is
        # allowed; None (no padding) leaves the fastest (flash) kernel available on GPU.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused matrix."""

    def __init__(self, c: MDMConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(c.d_model, 2 * c.d_ff, bias=False)
        self.down = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block; both residual branches scaled by m_L^(-alpha) (CompleteP)."""

    def __init__(self, c: MDMConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c)
        self.residual_scale = c.residual_scale

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.residual_scale * self.attn(self.attn_norm(h), cos, sin, key_mask)
        return h + self.residual_scale * self.mlp(self.mlp_norm(h))


class MDM(nn.Module):
    """The denoiser: ``model(tokens, pad=None, select=None)`` -> logits over the joint vocabulary.

    Args (forward):
        tokens: (B, L) int64 ids of the partially masked sequence x_t.
        pad: (B, L) bool, True on real positions; padded keys get no attention. Default None: all real.
        select: (B, L) bool; when given, logits only at these positions, shape (n, V) in row-major order.
    """

    def __init__(self, config: MDMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.final_norm = RMSNorm(c.d_model, c.norm_eps)
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CompleteP initialisation: hidden matrices std init_std / sqrt(m), embeddings and head std init_std."""
        c = self.config
        nn.init.normal_(self.embed.weight, std=c.init_std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=c.init_std)
        hidden = _hidden_names(self)
        for name, p in self.named_parameters():
            if name in hidden:
                nn.init.normal_(p, std=c.init_std / math.sqrt(c.width_mult))
            elif p.dim() == 1:
                nn.init.ones_(p)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor | None = None, *,
                select: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        on_cuda = tokens.is_cuda and c.autocast_dtype is not None
        ctx = torch.autocast("cuda", dtype=getattr(torch, c.autocast_dtype)) if on_cuda else nullcontext()
        with ctx:
            h = self.embed(tokens)
            if c.input_mult != 1.0:
                h = h * c.input_mult
            key_mask = None
            if pad is not None and not bool(pad.all()):
                # A fully padded row would have no key at all (softmax of nothing = NaN): let it see itself.
                keys = pad | ~pad.any(dim=-1, keepdim=True)
                key_mask = keys[:, None, None, :]
            cos, sin = rope_tables(tokens.shape[1], c.head_dim, c.rope_base, tokens.device, h.dtype)
            for block in self.blocks:
                h = block(h, cos, sin, key_mask)
            if select is not None:
                h = h[select]  # the head (V x d per position) is the costly part: run it only where needed
            # muP readout: logits scaled by output_mult / m so their size does not grow with width.
            h = self.final_norm(h) * (c.output_mult / c.width_mult)
            return F.linear(h, self.output_weight())


def _hidden_names(model: MDM) -> set[str]:
    """Names of the hidden (width x width) matrices: the ones whose lr and init scale with 1/m."""
    return {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}


def build_model(config: MDMConfig, device: str | torch.device | None = None) -> MDM:
    """Construct the model on ``device`` (default CPU); ``torch.compile`` it in place when config.compile is set and
    the device is CUDA (in place keeps the state_dict keys free of compile prefixes)."""
    device = torch.device(device if device is not None else "cpu")
    model = MDM(config).to(device)
    if config.compile and device.type == "cuda":
        model.compile()
    return model


def param_groups(model: MDM, base_lr: float, weight_decay: float = 0.0, *,
                 eps: float | None = None) -> list[dict]:
    """AdamW param groups with CompleteP's per-group learning rates (see the module docstring).

    Args:
        model: an :class:`MDM`.
        base_lr: learning rate tuned at the base shape (per update).
        weight_decay: decoupled weight decay tuned at the base shape (torch AdamW's, applied as lr x wd per update).
            Default 0.
        eps: Adam epsilon tuned at the base shape; scaled per group when given. Default None: the optimizer's.

    Returns groups named "hidden" (lr base_lr / m, weight decay weight_decay * m), "embedding" (input embedding and
    untied head: lr base_lr, no decay) and "norm" (RMSNorm gains: lr base_lr, no decay); each carries ``lr_mult``.
    """
    if not base_lr > 0 or weight_decay < 0:
        raise ValueError(f"base_lr must be positive and weight_decay non-negative, got {base_lr}, {weight_decay}")
    c = model.config
    m, ml = c.width_mult, c.depth_mult
    hidden = _hidden_names(model)
    by_group: dict[str, list[nn.Parameter]] = {"hidden": [], "embedding": [], "norm": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in hidden:
            by_group["hidden"].append(p)
        elif name in ("embed.weight", "head.weight"):
            by_group["embedding"].append(p)
        elif p.dim() == 1:
            by_group["norm"].append(p)
        else:
            raise ValueError(f"param_groups does not know where {name!r} belongs")
    depth_lr = ml ** (c.depth_alpha - 1.0)  # CompleteP's depth correction of hidden lr; 1 at alpha = 1
    spec = {"hidden": (depth_lr / m, weight_decay * m, 1.0 / (m * ml ** c.depth_alpha)),
            "embedding": (1.0, 0.0, 1.0 / m),
            "norm": (depth_lr, 0.0, 1.0 / (m * ml ** c.depth_alpha))}
    groups = []
    for name, params in by_group.items():
        if not params:
            continue
        lr_mult, wd, eps_mult = spec[name]
        g = {"params": params, "name": name, "lr": base_lr * lr_mult, "lr_mult": lr_mult, "weight_decay": wd}
        if eps is not None:
            g["eps"] = eps * eps_mult
        groups.append(g)
    return groups


def param_count(config: MDMConfig) -> dict[str, int]:
    """Parameters by kind: "embedding" (input embedding, plus the head when untied), "non_embedding" (blocks and
    final norm), "total"."""
    c = config
    d, f, hd = c.d_model, c.d_ff, c.head_dim
    per_block = 3 * d * d + d * d + 2 * d * f + f * d + 2 * d + 2 * hd  # qkv, out, gate_up, down, 2 norms, qk norms
    embedding = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    non_embedding = c.n_layers * per_block + d
    return {"embedding": embedding, "non_embedding": non_embedding, "total": embedding + non_embedding}


def flops_per_token(config: MDMConfig) -> float:
    """Training FLOPs per token (forward + backward), PaLM's count (Chowdhery et al. 2022, appendix B):
    6 N + 12 n_layers d_model seq_len, with N the parameters used in matmuls (the blocks plus the output head; the
    input embedding is a lookup) and the attention term counting q.k and attention-times-v over the full,
    bidirectional sequence (no causal halving). An upper bound here: the loss runs the head only at masked positions."""
    c = config
    n = param_count(c)["non_embedding"] + c.vocab_size * c.d_model
    return 6.0 * n + 12.0 * c.n_layers * c.d_model * c.seq_len


def describe(config: MDMConfig, name: str | None = None) -> str:
    """One line: shape, parameter counts and training FLOPs per token."""
    p = param_count(config)
    c = config
    return (f"{name + ': ' if name else ''}d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads, "
            f"seq {c.seq_len}, vocab {c.vocab_size:,}{' (tied)' if c.tie_embeddings else ''} | params "
            f"{p['total'] / 1e6:.1f}M (embedding {p['embedding'] / 1e6:.1f}M, non-embedding "
            f"{p['non_embedding'] / 1e6:.1f}M) | {flops_per_token(c) / 1e9:.3g} GFLOP/token (train)")
