"""The search's generation-free proxy for refusal, and the margin by which it may prune.

The proxy counts the harmful evaluation prompts whose greedy first reply token is one of the
model's own refusal openers (one prompt pass, the pass that generating continues from). A trial
is pruned when a fully measured trial dominates it on the proxy's evidence: no more KL, and fewer
prompts not complied with than the trial's predicted refusals less a margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from refusal_lab.search.result import TrialResult


@dataclass(frozen=True)
class Proxy:
    """How trials are measured before generating."""

    refusal_ids: tuple[int, ...] = ()  # the model's own refusal openers; none: no predictions
    margin: float | None = 0.1  # share of prompts the proxy may be off by; None: no proxy
    learn: int = 0  # measured trials after which the margin is the proxy's own worst over-prediction

    def refusals(self, first: torch.Tensor) -> int | None:
        """Prompts whose greedy first reply token (`first`) is a refusal opener."""
        if not self.refusal_ids:
            return None
        return int(torch.isin(first.cpu(), torch.tensor(self.refusal_ids)).sum())

    def score(self, logits: torch.Tensor) -> float:
        """The proxy as a refusal score of first-token logits (what the layer selection ranks by)."""
        return self.refusals(logits.argmax(-1))

    def fidelity(self) -> str:
        """How a trial is measured: a study of full-only trials is not mixed with proxy-pruned ones."""
        if self.margin is None:
            return "full"
        learned = f", learned after {self.learn}" if self.learn else ""
        return f"proxy-v1 margin {self.margin}{learned}"

    def fixed_slack(self, n: int) -> float:
        """--proxy-margin in prompts, of n."""
        return (self.margin or 0.0) * n

    def slack(self, done: list[Any], n: int) -> float:
        """How many of n prompts the proxy may over-predict by before it prunes.

        The fixed margin until `learn` trials were measured in full; then the proxy's own largest
        over-prediction on them (never more than the fixed margin): a proxy that has been exact on this
        model prunes what it predicts to be dominated, one that over-predicts keeps its margin.
        """
        fixed = self.fixed_slack(n)
        seen = over_predictions(done)
        if not self.learn or len(seen) < self.learn:
            return fixed
        return min(fixed, max(0.0, *seen))


def over_predictions(done: list[Any]) -> list[float]:
    """Predicted refusals less prompts not complied with, for each finished trial measured with the
    proxy: a positive value is the error that could prune a trial wrongly."""
    results = [TrialResult.of(t) for t in done]
    return [float(r.predicted_refused - r.not_complied) for r in results if r and r.predicted_refused is not None]
