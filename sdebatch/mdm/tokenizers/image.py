"""A discrete image tokenizer trained locally: a small VQ-VAE with an EMA codebook and dead-code restarts.

Images (N, 3, H, W) float in [0, 1] become a grid of (H / f) x (W / f) codes in [0, codebook_size), flattened
row-major to (N, tokens_per_image). The codebook is updated by exponential moving averages of the encoder
outputs assigned to each code (van den Oord et al. 2017, Razavi et al. 2019), which trains faster and more
stably than a codebook loss. Codes nobody uses stay put forever under EMA ("dead codes", the known failure of
VQ training), so every ``restart_every`` steps codes with a tiny EMA count are re-initialised from encoder
outputs of the batch, drawn in proportion to their quantisation error: new codes go where the codebook fits
worst (object edges and colours), not onto the black background that most vectors show.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from .files import load_folder, save_folder

FORMAT, VERSION = "sdebatch.image_tokenizer", 1


@dataclass
class ImageTokenizerConfig:
    """Architecture and codebook settings.

    Args:
        image_size: input side in pixels (default 32).
        downsample: pixels per code along each side, dividing image_size (default 4: 32 x 32 -> 8 x 8 = 64 codes).
        codebook_size: number of codes (default 256).
        code_dim: dimension of a code vector (default 32).
        channels: convolution width at the code resolution (default 128).
        res_blocks: residual 3x3 blocks in each of encoder and decoder (default 2).
        ema_decay: EMA decay of code counts and sums per step (default 0.99).
        commitment: weight of the commitment loss ||z - sg(q)||^2 (default 0.25).
        dead_threshold: a code whose EMA count (vectors per step) falls below this is dead (default 0.5).
        restart_every: steps between dead-code restarts (default 25; 0 disables them).
    """

    image_size: int = 32
    downsample: int = 4
    codebook_size: int = 256
    code_dim: int = 32
    channels: int = 128
    res_blocks: int = 2
    ema_decay: float = 0.99
    commitment: float = 0.25
    dead_threshold: float = 0.5
    restart_every: int = 25

    def __post_init__(self) -> None:
        f = self.downsample
        if f < 1 or self.image_size % f:
            raise ValueError(f"downsample must divide image_size, got {f} for {self.image_size}")
        if self.codebook_size < 2 or self.code_dim < 1 or self.channels < 1 or self.res_blocks < 0:
            raise ValueError("codebook_size >= 2, code_dim >= 1, channels >= 1 and res_blocks >= 0 are required")


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 1))

    def forward(self, x):
        return x + self.net(x)


def _coder(cfg: ImageTokenizerConfig, decode: bool) -> nn.Sequential:
    """Patch coders. Encoder: an f x f stride-f convolution (a linear map of each patch), residual 3x3 blocks
    at the code resolution (neighbouring patches as context), 1x1 to code_dim. Decoder: 3x3 from code_dim,
    residual blocks, 1x1 to the f * f * 3 pixels of each patch, pixel shuffle. Nothing runs at full resolution,
    which keeps training CPU-cheap; shapes this simple need no more (4 x 4 patches of scenes take ~1k values)."""
    c, f = cfg.channels, cfg.downsample
    blocks = [_Res(c) for _ in range(cfg.res_blocks)]
    if not decode:
        return nn.Sequential(nn.Conv2d(3, c, f, stride=f), *blocks, nn.SiLU(), nn.Conv2d(c, cfg.code_dim, 1))
    return nn.Sequential(nn.Conv2d(cfg.code_dim, c, 3, padding=1), *blocks, nn.SiLU(),
                         nn.Conv2d(c, 3 * f * f, 1), nn.PixelShuffle(f))


class _VQVAE(nn.Module):
    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = _coder(cfg, False), _coder(cfg, True)
        self.register_buffer("codebook", torch.zeros(cfg.codebook_size, cfg.code_dim))
        self.register_buffer("ema_count", torch.zeros(cfg.codebook_size))
        self.register_buffer("ema_sum", torch.zeros(cfg.codebook_size, cfg.code_dim))

    def encode_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, h, w, code_dim) continuous encoder outputs."""
        return self.encoder(x * 2 - 1).permute(0, 2, 3, 1)

    def nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of the nearest code and the squared distance to it, for vectors z (..., code_dim)."""
        flat = z.reshape(-1, z.shape[-1])
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.pow(2).sum(1))
        dist, idx = d.min(1)
        return idx.view(z.shape[:-1]), dist.clamp_min(0).view(z.shape[:-1])

    def decode_codes(self, idx: torch.Tensor) -> torch.Tensor:
        """(N, h, w) code indices -> (N, 3, H, W) in [0, 1]."""
        q = self.codebook[idx].permute(0, 3, 1, 2)
        return ((self.decoder(q) + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] (peak 1), shape (N,); MSE floored at 1e-10."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


class ImageTokenizer:
    """Encode images to codes and back. Build with :meth:`train` or :meth:`load`; always in eval mode.

    Not an ``nn.Module`` (its ``train`` is the training entry point); the network is ``self.model``.
    """

    def __init__(self, config: ImageTokenizerConfig, model: _VQVAE | None = None) -> None:
        self.config = config
        # float32 regardless of the default dtype: codes must not depend on a global setting.
        self.model = (model or _VQVAE(config)).to(torch.float32).eval()

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        s = self.config.image_size // self.config.downsample
        return s, s

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def device(self) -> torch.device:
        return self.model.codebook.device

    def to(self, device) -> ImageTokenizer:
        self.model.to(device)
        return self

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be (N, 3, {s}, {s}) floats in [0, 1], got {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> LongTensor (N, tokens_per_image) of codes, row-major over the grid.
        Deterministic (nearest code, no sampling); processed ``batch_size`` images at a time."""
        images = self._check(images)
        out = [self.model.nearest(self.model.encode_vectors(images[i:i + batch_size]))[0].flatten(1)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.tokens_per_image, dtype=torch.long)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """LongTensor (N, tokens_per_image) of codes -> float32 images (N, 3, H, W) in [0, 1]."""
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"codes must be (N, {self.tokens_per_image}), got {tuple(codes.shape)}")
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must be in [0, {self.codebook_size})")
        codes = codes.to(self.device, torch.long).view(-1, *self.grid)
        out = [self.model.decode_codes(codes[i:i + batch_size]) for i in range(0, len(codes), batch_size)]
        s = self.config.image_size
        return torch.cat(out) if out else torch.zeros(0, 3, s, s, dtype=torch.float32)

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict:
        """On (ideally held-out) images: mean per-image reconstruction ``psnr`` (dB), ``baseline_psnr`` of each image
        replaced by its mean colour, their difference ``psnr_margin``, ``utilisation`` (fraction of codes used)
        and ``perplexity`` (exp of the entropy of code usage; at most codebook_size)."""
        images = self._check(images)
        codes = self.encode(images)
        p = psnr(self.decode(codes), images).mean().item()
        base = psnr(images.mean((2, 3), keepdim=True).expand_as(images), images).mean().item()
        freq = torch.bincount(codes.flatten().cpu(), minlength=self.codebook_size).double()
        freq /= freq.sum()
        ent = -(freq[freq > 0] * freq[freq > 0].log()).sum().item()
        return {"psnr": p, "baseline_psnr": base, "psnr_margin": p - base,
                "utilisation": (freq > 0).double().mean().item(), "perplexity": math.exp(ent)}

    @classmethod
    def train(cls, images: torch.Tensor, config: ImageTokenizerConfig | None = None, *, steps: int = 1500,
              batch_size: int = 64, lr: float = 5e-3, seed: int = 0, progress: bool = True) -> ImageTokenizer:
        """Train a tokenizer on images (N, 3, H, W) float in [0, 1] (CPU or the images' device).

        Args:
            config: architecture (default :class:`ImageTokenizerConfig`).
            steps: optimiser steps (default 1500).
            batch_size: images per step (default 64), sampled with replacement.
            lr: Adam learning rate (default 5e-3), cosine-decayed to 5% with 50 warmup steps.
            seed: seeds initialisation, batches and restarts; same inputs and seed give the same tokenizer.
            progress: print a line every ~10% of training: reconstruction MSE (on [0, 1] pixels), the fraction
                of live codes and the number of dead-code restarts so far.
        """
        config = config or ImageTokenizerConfig()
        if len(images) == 0 or steps < 1 or batch_size < 1:
            raise ValueError(f"need images, steps >= 1 and batch_size >= 1; got {len(images)}, {steps}, {batch_size}")
        with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's global RNG
            torch.manual_seed(seed)
            tok = cls(config, _VQVAE(config).to(torch.float32))
        tok.to(images.device)
        images = tok._check(images)
        m, gen = tok.model.train(), torch.Generator(device="cpu").manual_seed(seed)
        opt = torch.optim.Adam(list(m.encoder.parameters()) + list(m.decoder.parameters()), lr=lr)
        warm = min(50, steps // 10 + 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
            0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
        start, every, restarts = time.time(), max(1, steps // 10), 0
        for step in range(steps):
            idx = torch.randint(len(images), (batch_size,), generator=gen).to(images.device)
            x = images[idx]
            z = m.encode_vectors(x)
            flat = z.detach().reshape(-1, config.code_dim)
            if step == 0:  # data-dependent init: codes start on encoder outputs, so none starts dead
                pick = torch.randint(len(flat), (config.codebook_size,), generator=gen).to(flat.device)
                m.codebook.copy_(flat[pick])
                m.ema_sum.copy_(flat[pick])
                m.ema_count.fill_(1.0)
            code, dist = m.nearest(z.detach())
            q = m.codebook[code]
            recon = m.decoder((z + (q - z).detach()).permute(0, 3, 1, 2))  # straight-through estimator
            rec_loss = F.mse_loss(recon, x * 2 - 1)
            loss = rec_loss + config.commitment * F.mse_loss(z, q)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # EMA codebook update (Laplace-smoothed counts keep divisions finite)
                onehot = F.one_hot(code.flatten(), config.codebook_size).to(flat.dtype)
                d = config.ema_decay
                m.ema_count.mul_(d).add_(onehot.sum(0), alpha=1 - d)
                m.ema_sum.mul_(d).add_(onehot.T @ flat, alpha=1 - d)
                n = m.ema_count.sum()
                count = (m.ema_count + 1e-5) / (n + config.codebook_size * 1e-5) * n
                m.codebook.copy_(m.ema_sum / count[:, None])
                if config.restart_every and (step + 1) % config.restart_every == 0 and step + 1 < steps:
                    dead = (m.ema_count < config.dead_threshold).nonzero().flatten()
                    restarts += len(dead)
                    if len(dead):
                        w = dist.flatten().double().cpu() + 1e-12
                        pick = torch.multinomial(w, len(dead), replacement=len(dead) > len(w), generator=gen)
                        m.codebook[dead] = flat[pick.to(flat.device)]
                        m.ema_sum[dead] = flat[pick.to(flat.device)] * config.dead_threshold
                        m.ema_count[dead] = config.dead_threshold
            if progress and ((step + 1) % every == 0 or step + 1 == steps):
                used = (m.ema_count >= config.dead_threshold).float().mean().item()
                print(f"image tokenizer step {step + 1}/{steps}  recon mse {rec_loss.item() / 4:.5f}  "
                      f"live codes {used:.0%}  restarted {restarts}  {time.time() - start:.0f}s", flush=True)
        m.eval()
        return tok

    def save(self, folder) -> Path:
        """Write ``weights.pt`` then ``config.json`` (format, version, config) atomically into ``folder``; the
        config goes last, so a folder with a config is complete."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return save_folder(folder, state, FORMAT, VERSION, asdict(self.config))

    @classmethod
    def load(cls, folder, device="cpu") -> ImageTokenizer:
        """Read a tokenizer written by :meth:`save`; ValueError naming the file if it is absent or foreign."""
        meta, state, _, _ = load_folder(folder, "image", FORMAT, VERSION)
        tok = cls(ImageTokenizerConfig(**meta))
        tok.model.load_state_dict(state)
        return tok.to(device)


def to_pil(image: torch.Tensor, scale: int = 1):
    """A (3, H, W) float image in [0, 1] as a PIL RGB image, each pixel a ``scale`` x ``scale`` block."""
    import numpy as np
    from PIL import Image

    a = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(a)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale != 1 else im


def png_bytes(im) -> bytes:
    """A PIL image encoded as PNG (for an atomic write)."""
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
