"""Progress of long work: a tqdm bar on a terminal, a periodic plain line otherwise.

A bar's carriage-return updates are right on a terminal and wrong in a log or a pipe (hundreds of KB of redrawn
bars); there the same progress is a line every ``every_s`` seconds: done / total, rate, elapsed, ETA and whatever
the caller reports (loss, tokens seen).
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def interactive(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def fmt_seconds(s: float) -> str:
    """4.2s, 3m05s, 1h02m."""
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class Progress:
    """``update(n, **info)`` as work is done, ``close()`` at the end (or use as a context manager).

    Args:
        total: units of work in all (None: unknown, no ETA).
        desc: what is running, printed first (e.g. "sample t2i").
        unit: the unit's name (default "step").
        every_s: seconds between lines when not on a terminal (default 10.0).
        stream: where to write (default stderr).
        bar: True a tqdm bar, False periodic lines; default: a bar exactly when ``stream`` is a terminal.
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "step", every_s: float = 10.0,
                 stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, float(every_s)
        self.stream = sys.stderr if stream is None else stream
        self.n = 0
        self.start = self._last = time.monotonic()
        self._bar = None
        if interactive(self.stream) if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **info: Any) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix(info, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(self.line(now, info), file=self.stream, flush=True)

    def line(self, now: float | None = None, info: dict | None = None) -> str:
        """The periodic line: ``[desc] 12/32 step (38%), 2.4 step/s, 5.0s elapsed, ETA 8.3s, key=value ...``."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        parts = [f"[{self.desc}] {self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({self.n / self.total:.0%})"
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"{fmt_seconds(elapsed)} elapsed")
        if self.total and self.n and elapsed > 0:
            parts.append(f"ETA {fmt_seconds((self.total - self.n) / rate)}")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (info or {}).items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
