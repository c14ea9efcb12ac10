"""One vocabulary and one sequence layout for text, image codes and audio codes.

Ids: special tokens first, then text ids, image codes and audio codes at their own offsets. Sequences:

    text      [TEXT] [BOT] doc ... [EOT] [BOT] doc ...            packed to the sequence length, no padding
    T2I       [T2I]  [BOT] caption [EOT] [BOI] codes [EOI] [PAD]...
    I2T       [I2T]  [BOI] codes [EOI] [BOT] caption [EOT] [PAD]...
    T2S / S2T the same with [BOA] audio codes [EOA]

Each laid-out sequence carries ``tokens``, ``pad`` (True where real), ``modality`` (per position: 0 special, 1 text,
2 image, 3 audio) and ``target`` (True on the positions of the modality the task generates: the caption for I2T /
S2T, the codes for T2I / T2S, everything for TEXT), so conditional training can mask only the target.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SPECIALS = ("[PAD]", "[MASK]", "[BOT]", "[EOT]", "[BOI]", "[EOI]", "[BOA]", "[EOA]",
            "[TEXT]", "[T2I]", "[I2T]", "[T2S]", "[S2T]")
TASKS = ("text", "t2i", "i2t", "t2s", "s2t")
SPECIAL, TEXT, IMAGE, AUDIO = 0, 1, 2, 3  # modality ids
_TASK_TOKEN = {"text": "[TEXT]", "t2i": "[T2I]", "i2t": "[I2T]", "t2s": "[T2S]", "s2t": "[S2T]"}


@dataclass(frozen=True)
class Vocab:
    """Sizes of the three sub-vocabularies; ids are laid out [specials | text | image | audio].

    Args:
        text_size: text tokenizer vocabulary size.
        image_codes: image tokenizer codebook size.
        audio_codes: audio tokenizer codebook size.
    """

    text_size: int
    image_codes: int
    audio_codes: int

    def __post_init__(self) -> None:
        for name in ("text_size", "image_codes", "audio_codes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def id(self, special: str) -> int:
        if special not in SPECIALS:
            raise ValueError(f"special must be one of {SPECIALS}, got {special!r}")
        return SPECIALS.index(special)

    @property
    def pad_id(self) -> int:
        return SPECIALS.index("[PAD]")

    @property
    def mask_id(self) -> int:
        return SPECIALS.index("[MASK]")

    @property
    def text_offset(self) -> int:
        return len(SPECIALS)

    @property
    def image_offset(self) -> int:
        return self.text_offset + self.text_size

    @property
    def audio_offset(self) -> int:
        return self.image_offset + self.image_codes

    @property
    def size(self) -> int:
        return self.audio_offset + self.audio_codes

    def modality_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token modality id (SPECIAL, TEXT, IMAGE, AUDIO)."""
        m = torch.zeros_like(tokens)
        m[(tokens >= self.text_offset) & (tokens < self.image_offset)] = TEXT
        m[(tokens >= self.image_offset) & (tokens < self.audio_offset)] = IMAGE
        m[tokens >= self.audio_offset] = AUDIO
        return m

    def state_dict(self) -> dict:
        return asdict(self)


def _segment(vocab: Vocab, kind: str, ids: list[int]) -> tuple[list[int], list[int]]:
    """[B?] ids [E?] with the offset applied, and the modality of each position."""
    offset, begin, end, mod = {"text": (vocab.text_offset, "[BOT]", "[EOT]", TEXT),
                               "image": (vocab.image_offset, "[BOI]", "[EOI]", IMAGE),
                               "audio": (vocab.audio_offset, "[BOA]", "[EOA]", AUDIO)}[kind]
    limit = {"text": vocab.text_size, "image": vocab.image_codes, "audio": vocab.audio_codes}[kind]
    bad = [i for i in ids if not 0 <= int(i) < limit]
    if bad:
        raise ValueError(f"{kind} ids must be in [0, {limit}), got {bad[:5]}")
    toks = [vocab.id(begin)] + [offset + int(i) for i in ids] + [vocab.id(end)]
    return toks, [SPECIAL] + [mod] * len(ids) + [SPECIAL]


def layout_pair(vocab: Vocab, task: str, text_ids: list[int], codes: list[int], seq_len: int) -> dict:
    """Lay out one conditional example: [task][condition][target], padded to ``seq_len``.

    Args:
        task: "t2i", "i2t", "t2s" or "s2t".
        text_ids: caption in text-tokenizer ids (no offset).
        codes: image or audio codes (no offset).
        seq_len: sequence length; a pair that does not fit is an error naming its length.
    """
    if task not in TASKS or task == "text":
        raise ValueError(f"task must be one of 't2i', 'i2t', 't2s', 's2t'; got {task!r}")
    other = "image" if task in ("t2i", "i2t") else "audio"
    text_seg = _segment(vocab, "text", text_ids)
    code_seg = _segment(vocab, other, codes)
    first, second = (text_seg, code_seg) if task in ("t2i", "t2s") else (code_seg, text_seg)
    tokens = [vocab.id(_TASK_TOKEN[task])] + first[0] + second[0]
    modality = [SPECIAL] + first[1] + second[1]
    target = [False] * (1 + len(first[0])) + [True] * len(second[0])
    if len(tokens) > seq_len:
        raise ValueError(f"a {task} pair of {len(tokens)} tokens does not fit seq_len={seq_len}")
    n_pad = seq_len - len(tokens)
    return {
        "tokens": torch.tensor(tokens + [vocab.pad_id] * n_pad),
        "pad": torch.tensor([True] * len(tokens) + [False] * n_pad),
        "modality": torch.tensor(modality + [SPECIAL] * n_pad),
        "target": torch.tensor(target + [False] * n_pad),
        "task": TASKS.index(task),
    }


def decode_pair(vocab: Vocab, tokens: torch.Tensor) -> tuple[str, list[int], list[int]]:
    """Inverse of :func:`layout_pair`: (task, text ids, codes), offsets removed, padding dropped."""
    toks = [int(t) for t in tokens]
    task = next((t for t, name in _TASK_TOKEN.items() if vocab.id(name) == toks[0]), None)
    if task is None or task == "text":
        raise ValueError(f"the first token ({toks[0]}) is not a pair task token")

    def between(begin: str, end: str, offset: int) -> list[int]:
        b, e = vocab.id(begin), vocab.id(end)
        if b not in toks or e not in toks:
            raise ValueError(f"sequence lacks {begin} ... {end}")
        i = toks.index(b)
        j = toks.index(e, i + 1)
        return [t - offset for t in toks[i + 1:j]]

    text = between("[BOT]", "[EOT]", vocab.text_offset)
    if task in ("t2i", "i2t"):
        codes = between("[BOI]", "[EOI]", vocab.image_offset)
    else:
        codes = between("[BOA]", "[EOA]", vocab.audio_offset)
    return task, text, codes


def pack_text(vocab: Vocab, documents, seq_len: int):
    """Pack text documents ([BOT] ids [EOT] ...) into sequences of exactly ``seq_len`` tokens, each starting with
    [TEXT]; a document longer than a sequence continues in the next one. Yields laid-out dicts like
    :func:`layout_pair` (task "text": every real position is a target; no padding)."""
    if seq_len < 4:
        raise ValueError(f"seq_len must be at least 4, got {seq_len}")
    task_tok = vocab.id("[TEXT]")
    buf: list[int] = []
    mods: list[int] = []
    for ids in documents:
        toks, m = _segment(vocab, "text", ids)
        buf += toks
        mods += m
        while len(buf) >= seq_len - 1:
            chunk, buf = buf[:seq_len - 1], buf[seq_len - 1:]
            mchunk, mods = mods[:seq_len - 1], mods[seq_len - 1:]
            yield {
                "tokens": torch.tensor([task_tok] + chunk),
                "pad": torch.ones(seq_len, dtype=torch.bool),
                "modality": torch.tensor([SPECIAL] + mchunk),
                "target": torch.tensor([False] + [True] * (seq_len - 1)),
                "task": TASKS.index("text"),
            }
