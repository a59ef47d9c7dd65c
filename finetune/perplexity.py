"""Perplexity figures as users read them: from a mean loss, side by side, and the change between two.

Light on purpose (no torch, no numpy): training's final line, the model card, `finetune eval` and its
torch-free ONNX path all format the same numbers here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

MAX_LOSS = 50.0  # exp(50) is already meaningless as a perplexity; beyond it the float overflows


def perplexity(loss: float) -> float:
    """exp(mean loss per token, in nats), capped so a diverged model does not overflow."""
    return math.exp(min(loss, MAX_LOSS))


def shown(value: float) -> str:
    """A perplexity to three significant figures or so: 1,234 / 41.2 / 9.81 / 1.05."""
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def relative_change(before: float, after: float) -> str:
    """The change from `before` to `after` in percent, with a real minus sign: "−76%", "+3.2%"."""
    change = (after - before) / before * 100 if before else 0.0
    text = f"{abs(change):.0f}" if abs(change) >= 10 else f"{abs(change):.1f}"
    if text in ("0", "0.0"):
        return "±0%"
    return f"{'−' if change < 0 else '+'}{text}%"


def change_line(before_loss: Optional[float], after_loss: Optional[float], what: str = "validation perplexity") -> str:
    """ "validation perplexity 41.2 → 9.8 (−76%)", or "" when either figure is missing."""
    if before_loss is None or after_loss is None:
        return ""
    before, after = perplexity(before_loss), perplexity(after_loss)
    return f"{what} {shown(before)} → {shown(after)} ({relative_change(before, after)})"


@dataclass
class Score:
    """Summed next-token loss (nats) over the tokens scored; the figures follow from the two."""

    nll_sum: float = 0.0
    tokens: int = 0

    def add(self, nll_sum: float, tokens: int) -> None:
        self.nll_sum += nll_sum
        self.tokens += tokens

    @property
    def loss(self) -> float:
        """Mean loss per scored token (nats/token)."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)
