"""Speech for the T2S / S2T tasks: eSpeak NG synthesis (offline, deterministic) and an LJSpeech-layout reader/writer.

eSpeak NG comes from the ``espeakng-loader`` wheel (shared library + voice data) and is driven through ctypes.
Its formant synthesiser keeps a process-wide pitch "flutter" phase and a glottal-cycle counter (for "roughness")
that carry over between utterances, so by default the same sentence comes out a few samples different depending on
what was spoken before. We load the voice with a variant that sets ``flutter 0`` and turns roughness off (installed
in a symlinked overlay of the data folder), which makes ``synthesize`` a pure function of (text, voice, rate);
everything else about the voice is unchanged.

LJSpeech layout: ``folder/metadata.csv`` with rows ``id|text[|normalized_text]`` (UTF-8, no header) and
``folder/wavs/<id>.wav`` (PCM or float WAV, any rate, mono or multi-channel).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import tempfile
import threading
import wave
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

from ...utils import atomic_write
from ..tokenizers.audio import write_wav

NATIVE_RATE = 22050  # eSpeak NG output rate, Hz
_STEADY = "sdebatch-steady"  # our voice variant (see module docstring)
# flutter 0: no pitch wobble from a phase that persists across utterances; roughness 8 (>= eSpeak's table size)
# turns off the every-n-glottal-cycles amplitude modulation, whose cycle counter also persists.
_VARIANT = "language variant\nname sdebatch-steady\nflutter 0\nroughness 8\n"
_LOCK = threading.Lock()  # eSpeak is a global state machine: one synthesis at a time per process
_STATE: dict = {}


def _data_overlay(data: Path) -> Path:
    """A folder mirroring eSpeak's data through symlinks, plus our variant in voices/!v (the package dir may be
    read-only, and eSpeak only finds variants under its data path)."""
    key = hashlib.sha1(f"{data}\n{_VARIANT}".encode()).hexdigest()[:10]
    dest = Path(tempfile.gettempdir()) / f"sdebatch-espeak-{os.getuid() if hasattr(os, 'getuid') else 0}-{key}"
    if (dest / "voices" / "!v" / _STEADY).exists():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + "-tmp", dir=dest.parent))
    link = os.symlink  # 21 MB of data: link, don't copy
    for item in data.iterdir():
        if item.name != "voices":
            link(item, tmp / item.name)
    (tmp / "voices" / "!v").mkdir(parents=True)
    for item in (data / "voices").iterdir():
        if item.name != "!v":
            link(item, tmp / "voices" / item.name)
    for item in (data / "voices" / "!v").iterdir():
        link(item, tmp / "voices" / "!v" / item.name)
    (tmp / "voices" / "!v" / _STEADY).write_text(_VARIANT)
    try:
        os.rename(tmp, dest)  # atomic publish; a concurrent process may have won the race, which is fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _engine():
    """Load and initialise eSpeak NG once per process; returns (lib, chunk list filled by the callback)."""
    if "lib" in _STATE:
        return _STATE["lib"], _STATE["chunks"]
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    path = _data_overlay(Path(espeakng_loader.get_data_path()))
    rate = lib.espeak_Initialize(2, 0, str(path).encode(), 0)  # 2 = AUDIO_OUTPUT_SYNCHRONOUS
    if rate != NATIVE_RATE:
        raise RuntimeError(f"espeak_Initialize failed or returned an unexpected rate ({rate}) for data {path}")
    chunks: list[np.ndarray] = []

    def collect(wav, n, _events):
        if wav and n > 0:
            chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        return 0  # 0 = continue synthesis

    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)(collect)
    lib.espeak_SetSynthCallback(callback)
    _STATE.update(lib=lib, chunks=chunks, callback=callback)  # keep the callback alive as long as the library
    return lib, chunks


def synthesize(texts, *, sample_rate: int = 16000, voice: str = "en-us", rate: int | None = None) -> list[np.ndarray]:
    """Speak each text with eSpeak NG.

    Args:
        texts: a string or a sequence of non-empty strings.
        sample_rate: output rate in Hz (default 16000); eSpeak's native 22050 Hz is resampled with a polyphase filter.
        voice: eSpeak voice name (default "en-us"). Without a "+variant" suffix our flutter-free variant is added
            so the output is deterministic; with an explicit variant determinism is up to eSpeak.
        rate: speaking rate in words per minute (80..450; default None = eSpeak's 175).

    Returns:
        One float32 waveform in [-1, 1] per text (about 0.5-5 s for a short sentence).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"text {i} must be a non-empty string, got {t!r}")
    if rate is not None and not 80 <= int(rate) <= 450:
        raise ValueError(f"rate must be in 80..450 words per minute, got {rate}")
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    name = voice if "+" in voice else f"{voice}+{_STEADY}"
    g = np.gcd(int(sample_rate), NATIVE_RATE)
    out = []
    with _LOCK:
        lib, chunks = _engine()
        if lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(1, 175 if rate is None else int(rate), 0)  # 1 = espeakRATE; global, so always set
        for i, t in enumerate(texts):
            chunks.clear()
            data = t.encode("utf-8") + b"\0"
            err = lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None)  # POS_CHARACTER, espeakCHARS_UTF8
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed with code {err} on text {i}: {t[:60]!r}")
            pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
            x = pcm.astype(np.float32) / 32768.0
            if sample_rate != NATIVE_RATE and len(x):
                x = resample_poly(x, sample_rate // g, NATIVE_RATE // g).astype(np.float32)
            out.append(x)
    return out


# ---------------------------------------------------------------- LJSpeech layout

class SpeechSet(NamedTuple):
    """What :func:`load_ljspeech` returns: parallel lists plus the number of rows skipped as bad."""
    ids: list[str]
    texts: list[str]
    waves: list[np.ndarray]
    skipped: int


def read_wav(path, sample_rate: int, *, strict_rate: bool = False) -> np.ndarray:
    """Read one WAV as mono float32 at ``sample_rate`` Hz; any problem is a ValueError naming the file.

    Args:
        strict_rate: if True a file at another rate is an error instead of being resampled (default False).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing wav file")
    try:
        sr, x = wavfile.read(path)
    except Exception as e:  # scipy raises ValueError, EOFError, struct.error... on corrupt files
        raise ValueError(f"{path}: unreadable wav ({type(e).__name__}: {e})") from None
    if x.dtype == np.uint8:
        x = (x.astype(np.float32) - 128) / 128
    elif np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)  # mono
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"{path}: empty or non-finite audio")
    if sr != sample_rate:
        if strict_rate:
            raise ValueError(f"{path}: sample rate {sr} Hz, expected {sample_rate} Hz")
        g = np.gcd(int(sr), int(sample_rate))
        x = resample_poly(x, sample_rate // g, sr // g).astype(np.float32)
    return x


def load_ljspeech(folder, sample_rate: int, *, skip_bad: bool = False, strict_rate: bool = False) -> SpeechSet:
    """Read an LJSpeech-style folder (``metadata.csv`` + ``wavs/<id>.wav``).

    The normalized text (third column) is used when present and non-empty, else the raw text.

    Args:
        folder: dataset folder.
        sample_rate: rate in Hz to return the audio at (files at other rates are resampled unless ``strict_rate``).
        skip_bad: skip bad rows (malformed row, empty text, missing/corrupt/empty wav, wrong rate with strict_rate)
            and count them in ``skipped``; if False (default) the first bad row raises a ValueError naming it.
        strict_rate: treat a file at another sample rate as bad (default False).
    """
    meta = Path(folder) / "metadata.csv"
    if not meta.is_file():
        raise ValueError(f"{meta}: missing (expected an LJSpeech layout: metadata.csv and wavs/<id>.wav)")
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{meta}: not UTF-8 ({e})") from None
    ids, texts, waves, skipped = [], [], [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            fields = line.split("|")
            if len(fields) not in (2, 3) or not fields[0].strip():
                raise ValueError(f"{meta}:{n}: expected 'id|text[|normalized_text]', got {line[:80]!r}")
            uid = fields[0].strip()
            text = (fields[2] if len(fields) == 3 and fields[2].strip() else fields[1]).strip()
            if not text:
                raise ValueError(f"{meta}:{n}: empty text for {uid!r}")
            x = read_wav(Path(folder) / "wavs" / f"{uid}.wav", sample_rate, strict_rate=strict_rate)
        except ValueError:
            if not skip_bad:
                raise
            skipped += 1
            continue
        ids.append(uid)
        texts.append(text)
        waves.append(x)
    return SpeechSet(ids, texts, waves, skipped)


def write_ljspeech(folder, texts, waves, sample_rate: int, *, ids=None) -> list[str]:
    """Write texts and waveforms as an LJSpeech folder (16-bit PCM WAVs); returns the ids.

    Every file is written to a temporary name then renamed, and metadata.csv comes last, so a reader never sees a
    row whose wav is incomplete.

    Args:
        texts: non-empty strings without '|' or newlines.
        waves: 1-D float arrays in [-1, 1] at ``sample_rate`` Hz (clipped).
        ids: file stems (default ``utt00000``, ``utt00001``, ...).
    """
    texts, waves = list(texts), list(waves)
    ids = [f"utt{i:05d}" for i in range(len(texts))] if ids is None else [str(i) for i in ids]
    if not len(texts) == len(waves) == len(ids):
        raise ValueError(f"got {len(texts)} texts, {len(waves)} waves and {len(ids)} ids")
    for i, (uid, t) in enumerate(zip(ids, texts)):
        if not t.strip() or any(c in t for c in "|\r\n"):
            raise ValueError(f"text {i} ({uid}) must be non-empty without '|' or newlines: {t[:60]!r}")
        if not uid or any(c in uid for c in "|/\\\r\n"):
            raise ValueError(f"bad id {uid!r}")
    wavs = Path(folder) / "wavs"
    wavs.mkdir(parents=True, exist_ok=True)
    for uid, x in zip(ids, waves):
        x = np.asarray(x, np.float64)
        if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
            raise ValueError(f"wave {uid}: expected a non-empty finite 1-D array, got shape {x.shape}")
        write_wav(wavs / f"{uid}.wav", x, sample_rate)
    atomic_write(Path(folder) / "metadata.csv", "".join(f"{uid}|{t}|{t}\n" for uid, t in zip(ids, texts)).encode())
    return ids
