"""The quality gate (`gate:`): the limits a quant must meet against its model's reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Settings, field

GATE_KEYS = ("max_dppl_pct", "max_kld", "min_tg_tps", "min_pp_tps")


@dataclass(frozen=True)
class Gate(Settings):
    """Limits a quant must meet against its model's reference; None = not checked."""

    SECTION = "gate"

    max_dppl_pct: float | None = field(None, positive=True)
    max_kld: float | None = field(None, positive=True)
    min_tg_tps: float | None = field(None, positive=True)  # TG tokens/s at the headline depth; no bench record: fails
    min_pp_tps: float | None = field(None, positive=True)

    SPEED_KEYS = ("min_tg_tps", "min_pp_tps")

    @property
    def active(self) -> bool:
        return any(getattr(self, k) is not None for k in GATE_KEYS)

    @property
    def max_ln_ppl_ratio(self) -> float | None:
        """The ΔPPL limit on the ln(PPL(Q)/PPL(ref)) axis."""
        return None if self.max_dppl_pct is None else math.log1p(self.max_dppl_pct / 100.0)

    def describe(self, only: str | None = None) -> str:
        """The limits in words; only='lnppl', 'kld', 'tg' or 'pp' names just the one a plot's axis shows."""
        parts = []
        if self.max_dppl_pct is not None and only in (None, "lnppl"):
            parts.append(f"ΔPPL ≤ {self.max_dppl_pct:g} %")
        if self.max_kld is not None and only in (None, "kld"):
            parts.append(f"mean KLD ≤ {self.max_kld:g}")
        if self.min_tg_tps is not None and only in (None, "tg"):
            parts.append(f"TG ≥ {self.min_tg_tps:g} t/s")
        if self.min_pp_tps is not None and only in (None, "pp"):
            parts.append(f"PP ≥ {self.min_pp_tps:g} t/s")
        return " and ".join(parts) if parts else "none configured"
