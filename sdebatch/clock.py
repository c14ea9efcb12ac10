"""The sample/token clock: what a run has seen, counted in the units the SDE dynamics are measured in."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Clock:
    """Counters advanced once per applied optimizer update (a skipped AMP step does not count).

    Attributes:
        updates: optimizer updates applied.
        samples_seen: samples (sequences) in applied updates, summed over data-parallel ranks.
        tokens_seen: tokens in applied updates (0 unless micro-steps report ``num_tokens``).
        skipped_updates: windows dropped because the AMP grad scaler found inf/nan.
        kappa_sum: sum of kappa over applied updates: the run's time in units of logical batches (x the
            horizon factor), which is what a bias correction with changing betas needs.
    """

    updates: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    skipped_updates: int = 0
    kappa_sum: float = 0.0

    def get(self, unit: str) -> float:
        """The clock in ``unit``: "samples", "tokens" or "updates"."""
        if unit not in ("samples", "tokens", "updates"):
            raise ValueError(f"unit must be one of 'samples', 'tokens', 'updates'; got {unit!r}")
        return {"samples": self.samples_seen, "tokens": self.tokens_seen, "updates": self.updates}[unit]

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in fields(self)}
        missing = names - set(state)
        if missing:
            raise ValueError(f"clock state is missing {sorted(missing)}")
        for name in names:
            setattr(self, name, type(getattr(self, name))(state[name]))
