"""Audio codes: one learned code per log-mel frame, decoded without a neural vocoder.

encode: waveform -> log-mel frames (magnitude STFT, one frame per ``hop`` samples) -> nearest vector of a k-means
codebook (k-means++ init, dead codes restarted on badly fitted frames). decode: codes -> codebook log-mel frames ->
interpolated to a 4x finer hop (Griffin-Lim needs heavily overlapping frames to find a consistent phase) -> linear
magnitude by the mel filterbank's pseudo-inverse (clamped >= 0) -> fast Griffin-Lim (seeded phase) -> waveform.
The defaults give 16000 / 512 = 31.25 tokens per second, short enough for the tiny model's sequences.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from ...utils import single_threaded
from .files import load_folder, save_folder

FORMAT, VERSION = "sdebatch.audio_tokenizer", 1
F32 = torch.float32  # explicit everywhere: callers (tests) may set another default dtype


@dataclass(frozen=True)
class AudioTokenizerConfig:
    """Args:
        sample_rate: waveform rate in Hz (default 16000).
        n_fft: STFT window and FFT size in samples (default 1024 = 64 ms).
        hop: samples per token (default 512 -> 31.25 tokens/s).
        n_mels: mel bands (default 80), HTK mel scale over [f_min, f_max] Hz (f_max None = sample_rate / 2).
        codebook_size: number of codes (default 256).
        log_floor: magnitude floor before the log (default 1e-5; digital silence maps to log(1e-5) = -11.5).
        gl_iters: Griffin-Lim iterations in decode (default 32; more barely changes the log-mel error).
        gl_upsample: Griffin-Lim runs at hop / gl_upsample (default 4, i.e. 87.5% overlap at the defaults).
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    hop: int = 512
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = None
    codebook_size: int = 256
    log_floor: float = 1e-5
    gl_iters: int = 32
    gl_upsample: int = 4

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if k not in ("f_min", "f_max", "log_floor") and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{k} must be a positive int, got {v!r}")
        if self.hop % self.gl_upsample or self.hop > self.n_fft:
            raise ValueError(f"need hop <= n_fft and hop divisible by gl_upsample, got {self.hop}, {self.gl_upsample}")


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None):
    """Triangular HTK-mel filters, shape (n_mels, n_fft // 2 + 1), float32, peak 1."""
    mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    edges = 700.0 * (10 ** (np.linspace(mel(f_min), mel(f_max or sample_rate / 2), n_mels + 2) / 2595.0) - 1.0)
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.tensor(fb, dtype=F32)


@single_threaded
def log_mel(wave, fb: torch.Tensor, n_fft: int, hop: int, floor: float = 1e-5) -> torch.Tensor:
    """(1 + len // hop, n_mels) natural-log mel magnitudes of a 1-D waveform (centred frames, zero padding)."""
    x = torch.as_tensor(np.asarray(wave) if not torch.is_tensor(wave) else wave).to(fb.device, F32)
    win = torch.hann_window(n_fft, dtype=F32, device=fb.device)
    spec = torch.stft(x, n_fft, hop, window=win, center=True, pad_mode="constant", return_complex=True)
    return (fb @ spec.abs()).clamp_min(floor).log().T


@single_threaded
def griffin_lim(mag: torch.Tensor, n_fft: int, hop: int, iters: int, length: int, seed: int = 0) -> torch.Tensor:
    """Waveform whose STFT magnitude approximates ``mag`` (n_fft // 2 + 1, frames): fast Griffin-Lim (Perraudin et
    al. 2013) with momentum 0.99; the initial phase comes from ``seed``, so the result is deterministic."""
    win = torch.hann_window(n_fft, dtype=F32, device=mag.device)
    gen = torch.Generator().manual_seed(seed)
    angles = torch.polar(torch.ones_like(mag), 2 * math.pi * torch.rand(mag.shape, generator=gen).to(mag))
    prev = torch.zeros_like(angles)
    for _ in range(iters):
        y = torch.istft(mag * angles, n_fft, hop, window=win, length=length)
        rebuilt = torch.stft(y, n_fft, hop, window=win, pad_mode="constant", return_complex=True)
        angles = rebuilt - prev * (0.99 / 1.99)
        angles = angles / (angles.abs() + 1e-16)
        prev = rebuilt
    return torch.istft(mag * angles, n_fft, hop, window=win, length=length)


class AudioTokenizer:
    """Waveform <-> codes. Build with :meth:`train` or :meth:`load`."""

    def __init__(self, config: AudioTokenizerConfig, codebook: torch.Tensor | None = None) -> None:
        self.config = c = config
        self.fb = mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max)
        self.fb_pinv = torch.linalg.pinv(self.fb)  # (n_freq, n_mels): least-squares inverse of the mel projection
        self.codebook = (torch.zeros(c.codebook_size, c.n_mels, dtype=F32) if codebook is None
                         else codebook.detach().to(F32).clone())

    codebook_size = property(lambda self: self.config.codebook_size)
    tokens_per_second = property(lambda self: self.config.sample_rate / self.config.hop)

    def to(self, device) -> AudioTokenizer:
        self.fb, self.fb_pinv, self.codebook = (t.to(device) for t in (self.fb, self.fb_pinv, self.codebook))
        return self

    def features(self, wave) -> torch.Tensor:
        """Log-mel frames (T, n_mels) of a 1-D waveform at ``config.sample_rate``; the space codes live in."""
        x = torch.as_tensor(np.asarray(wave) if not torch.is_tensor(wave) else wave)
        if x.ndim != 1 or x.numel() == 0 or not torch.isfinite(x).all():
            raise ValueError(f"expected a non-empty finite 1-D waveform, got shape {tuple(x.shape)}")
        return log_mel(x, self.fb, self.config.n_fft, self.config.hop, self.config.log_floor)

    def _nearest(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist, idx = (f.pow(2).sum(1, keepdim=True) - 2 * f @ self.codebook.T + self.codebook.pow(2).sum(1)).min(1)
        return idx, dist.clamp_min(0)

    @torch.no_grad()
    def encode(self, wave) -> torch.Tensor:
        """Codes (1 + len(wave) // hop,) int64 of a 1-D float waveform; deterministic."""
        return self._nearest(self.features(wave))[0]

    def encode_batch(self, waves) -> list[torch.Tensor]:  # clips differ in length: a list, not a padded tensor
        return [self.encode(w) for w in waves]

    @torch.no_grad()
    def decode(self, codes, seed: int = 0) -> np.ndarray:
        """float32 waveform of (T - 1) * hop samples from codes (T,); ``seed`` fixes Griffin-Lim's initial phase."""
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.codebook.device).flatten()
        if len(codes) and not (0 <= int(codes.min()) and int(codes.max()) < self.codebook_size):
            raise ValueError(f"codes must be in [0, {self.codebook_size}), got {int(codes.min())}..{int(codes.max())}")
        c, t = self.config, len(codes)
        if t < 2:
            return np.zeros(0, np.float32)
        frames = torch.nn.functional.interpolate(  # (n_mels, finer frames), interpolated in the log domain
            self.codebook[codes].T[None], size=(t - 1) * c.gl_upsample + 1, mode="linear", align_corners=True)[0]
        mag = (self.fb_pinv @ frames.exp()).clamp_min(0)
        y = griffin_lim(mag, c.n_fft, c.hop // c.gl_upsample, c.gl_iters, (t - 1) * c.hop, seed)
        return y.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def evaluate(self, waves, seed: int = 0) -> dict:
        """On (ideally held-out) clips, mean absolute log-mel difference per frame and band (natural-log units) to
        the original of: ``logmel_l1`` decode(encode(x)); ``codes_l1`` the codebook frames themselves (no
        Griffin-Lim); baselines ``silence_l1`` (all-zero audio) and ``random_l1`` (decode of uniform random codes).
        Also ``utilisation`` (fraction of codes used), ``perplexity`` (exp entropy of code use) and
        ``tokens_per_second``."""
        if not len(waves):
            raise ValueError("evaluate needs at least one clip")
        gen = torch.Generator().manual_seed(seed)
        sums, n, used = dict.fromkeys(("logmel_l1", "codes_l1", "silence_l1", "random_l1"), 0.0), 0, []

        def l1(y, ref):
            f = self.features(y) if len(y) else ref[:0]
            t = min(len(f), len(ref))
            return (f[:t] - ref[:t]).abs().sum().item() / t * len(ref)  # frame-weighted, on the original's length

        for w in waves:
            ref = self.features(w)
            used.append(codes := self._nearest(ref)[0])
            sums["logmel_l1"] += l1(self.decode(codes, seed), ref)
            sums["codes_l1"] += (self.codebook[codes] - ref).abs().sum().item()
            sums["silence_l1"] += (self.features(np.zeros(len(w), np.float32)) - ref).abs().sum().item()
            sums["random_l1"] += l1(self.decode(torch.randint(self.codebook_size, codes.shape, generator=gen)), ref)
            n += ref.numel()
        out = {k: v / max(n, 1) for k, v in sums.items()}
        freq = torch.bincount(torch.cat(used).cpu(), minlength=self.codebook_size).double()
        p = freq[freq > 0] / freq.sum()
        out.update(utilisation=(freq > 0).double().mean().item(), perplexity=math.exp(-(p * p.log()).sum().item()),
                   tokens_per_second=self.tokens_per_second)
        return out

    @classmethod
    def train(cls, waves, config: AudioTokenizerConfig | None = None, *, iterations: int = 40, seed: int = 0,
              max_init: int = 20000, progress: bool = True) -> AudioTokenizer:
        """Fit the codebook by k-means on the log-mel frames of ``waves`` (1-D float arrays at config.sample_rate).

        Args:
            config: frame and codebook settings (default :class:`AudioTokenizerConfig`).
            iterations: at most this many Lloyd iterations (default 40; stops once assignments repeat). Codes left
                without frames restart on frames sampled in proportion to their squared error, so few stay dead.
            seed: seeds the init and restarts; same inputs and seed give the same codebook.
            max_init: k-means++ runs on at most this many randomly chosen frames (default 20000), for speed.
            progress: print the mean squared error and live codes every ~10% of the iterations.
        """
        tok, start = cls(config or AudioTokenizerConfig()), time.time()
        frames = torch.cat([tok.features(w) for w in waves] or [torch.zeros(0, tok.config.n_mels)])
        if len(frames) == 0:
            raise ValueError("no training audio")
        k, gen = tok.codebook_size, torch.Generator().manual_seed(seed)
        sub = frames[torch.randperm(len(frames), generator=gen)[:max_init]]
        centers = [sub[torch.randint(len(sub), (1,), generator=gen)]]  # k-means++: spread the initial codes out
        best = (sub - centers[0]).pow(2).sum(1)
        for _ in range(1, k):
            centers.append(sub[torch.multinomial(best.double() + 1e-12, 1, generator=gen)])
            best = torch.minimum(best, (sub - centers[-1]).pow(2).sum(1))
        tok.codebook = torch.cat(centers).to(frames.device)
        every, last = max(1, iterations // 10), None  # Lloyd iterations
        for it in range(iterations):
            idx, dist = tok._nearest(frames)
            done = last is not None and torch.equal(idx, last)  # converged: same assignment, same means
            last = idx
            count, sums = torch.bincount(idx, minlength=k), torch.zeros_like(tok.codebook).index_add_(0, idx, frames)
            live = count > 0
            tok.codebook[live] = sums[live] / count[live, None].to(F32)
            dead = (~live).nonzero().flatten()
            if len(dead) and it + 1 < iterations and not done:
                w = dist.double().cpu() + 1e-12
                tok.codebook[dead] = frames[torch.multinomial(w, len(dead), len(dead) > len(w), generator=gen)]
            if progress and ((it + 1) % every == 0 or it + 1 == iterations or done):
                print(f"audio tokenizer k-means {it + 1}/{iterations}  mse {dist.mean().item():.4f}  "
                      f"live codes {live.float().mean().item():.0%}  {time.time() - start:.1f}s",
                      file=sys.stderr, flush=True)
            if done:
                break
        return tok

    def save(self, folder) -> Path:
        """Write ``weights.pt`` (the codebook) then ``config.json`` (format, version, config) atomically into
        ``folder``; the config goes last, so a folder with a config is complete."""
        return save_folder(folder, {"codebook": self.codebook.detach().cpu()}, FORMAT, VERSION, asdict(self.config))

    @classmethod
    def load(cls, folder, device="cpu") -> AudioTokenizer:
        """Read a tokenizer written by :meth:`save`; ValueError naming the file if it is absent or foreign."""
        meta, state, cfg_path, w_path = load_folder(folder, "audio", FORMAT, VERSION)
        config, book = AudioTokenizerConfig(**meta), state["codebook"]
        if tuple(book.shape) != (config.codebook_size, config.n_mels):
            raise ValueError(f"{w_path}: codebook shape {tuple(book.shape)} does not match {cfg_path}")
        return cls(config, book).to(device)


def mel_cepstral_distortion(a, b, sample_rate: int, *, n_mfcc: int = 13, n_mels: int = 80) -> float:
    """Mel cepstral distortion in dB between two 1-D waveforms, averaged along their DTW alignment.

    MFCCs are the orthonormal DCT-II of natural-log mel magnitudes (64 ms window, 16 ms hop), coefficients 1..n_mfcc
    (c0, loudness, excluded); frame distance (10 / ln 10) * sqrt(2 * sum (ca - cb)^2). Identical clips give 0.
    """
    from scipy.fft import dct

    n_fft = 2 ** round(math.log2(0.064 * sample_rate))
    fb = mel_filterbank(sample_rate, n_fft, n_mels)
    ca, cb = (dct(log_mel(x, fb, n_fft, n_fft // 4).double().numpy(), type=2, norm="ortho", axis=1)[:, 1:n_mfcc + 1]
              for x in (a, b))
    cost = (10 / np.log(10)) * np.sqrt(2 * ((ca[:, None, :] - cb[None, :, :]) ** 2).sum(-1))
    (n, m), prev = cost.shape, np.full(cost.shape[1], np.inf)
    acc = np.full((n, m), np.inf)
    for i in range(n):
        # D[i,j] = c[i,j] + min(a_j, D[i,j-1]) with a_j = min(D[i-1,j], D[i-1,j-1]): a running minimum, vectorised
        a_j = np.minimum(prev, np.concatenate(([0.0 if i == 0 else np.inf], prev[:-1])))
        s = np.cumsum(cost[i])
        acc[i] = s + np.minimum.accumulate(a_j - (s - cost[i]))
        prev = acc[i]
    i, j, steps = n - 1, m - 1, 1  # backtrack only to count the path length
    while i > 0 or j > 0:  # ties prefer the diagonal (listed first)
        i, j = min(((i - 1, j - 1), (i - 1, j), (i, j - 1)), key=lambda p: acc[p] if min(p) >= 0 else np.inf)
        steps += 1
    return float(acc[-1, -1] / steps)


def write_wav(path, wave, sample_rate: int) -> None:
    """A mono 16-bit PCM WAV of ``wave`` (floats, clipped to [-1, 1]; NaN -> 0), written atomically."""
    import io

    from scipy.io import wavfile

    from ...utils import atomic_write

    pcm = (np.clip(np.nan_to_num(np.asarray(wave, np.float64)), -1.0, 1.0) * 32767).round().astype(np.int16)
    buf = io.BytesIO()
    wavfile.write(buf, int(sample_rate), pcm)
    atomic_write(path, buf.getvalue())


def read_wav(path, sample_rate: int) -> np.ndarray:
    """A WAV file as float64 mono in [-1, 1] at ``sample_rate`` Hz (channels averaged; other rates resampled with a
    polyphase filter); ValueError naming the file when it is absent or not a PCM / float WAV."""
    from fractions import Fraction

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        rate, data = wavfile.read(path)
    except Exception as e:
        raise ValueError(f"{path} is not a WAV file scipy can read ({e})") from None
    if data.dtype.kind == "f":
        x = data.astype(np.float64)
    elif data.dtype == np.uint8:
        x = (data.astype(np.float64) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        x = data.astype(np.float64) / float(np.iinfo(data.dtype).max)
    else:
        raise ValueError(f"{path}: samples of type {data.dtype} are not PCM or float")
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.size == 0:
        raise ValueError(f"{path} has no samples")
    if rate != sample_rate:
        ratio = Fraction(int(sample_rate), int(rate)).limit_denominator(1000)
        x = resample_poly(x, ratio.numerator, ratio.denominator)
    return x
