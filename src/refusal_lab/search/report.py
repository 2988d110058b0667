"""What a search reports: the front as a table and a plot, and how well the proxy predicted (proxy.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from refusal_lab.search import study as S
from refusal_lab.search.proxy import over_predictions
from refusal_lab.search.result import FrontPoint, TrialResult, predicted
from refusal_lab.search.setup import SearchSetup


@dataclass(frozen=True)
class ProxyReport:
    """How the proxy did: trials pruned by it, and its error on the trials measured in full (proxy.json)."""

    trials: int
    pruned_by_kl: int
    pruned_by_proxy: int
    measured_with_proxy: int
    mean_abs_error: float | None
    over_predictions: int  # beyond the margin: the error that could prune a trial wrongly
    largest_over_prediction: float | None
    margin: float | None
    learned_after: int | None
    final_slack: float | None
    refusal_openers: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def proxy_report(study: Any, setup: SearchSetup) -> ProxyReport:
    """The proxy's record over the study's finished trials.

    An over-prediction beyond the margin (predicted refusals - margin > measured not complied) is the
    error that could prune a trial wrongly; it is counted.
    """
    import optuna

    TS = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED))
    measured = [t for t in trials if t.state == TS.COMPLETE and predicted(t) is not None]
    results = [TrialResult.of(t) for t in measured]
    errors = [abs(r.predicted_refused - r.refused) for r in results if r]
    over = over_predictions(measured)
    proxy, n = setup.proxy, len(setup.eval_harmful)
    return ProxyReport(
        trials=len(trials),
        pruned_by_kl=sum(t.user_attrs.get("pruned_by", "kl") == "kl" for t in trials if t.state == TS.PRUNED),
        pruned_by_proxy=sum(t.user_attrs.get("pruned_by") == "proxy" for t in trials),
        measured_with_proxy=len(measured),
        mean_abs_error=sum(errors) / len(errors) if errors else None,
        over_predictions=sum(o > proxy.fixed_slack(n) for o in over),
        largest_over_prediction=max(over) if over else None,
        margin=proxy.margin,
        learned_after=proxy.learn or None,
        final_slack=proxy.slack(measured, n) if proxy.margin is not None else None,
        refusal_openers=[setup.loaded.tokenizer.decode([i]) for i in proxy.refusal_ids],
    )


def front_table(front: list[FrontPoint]) -> str:
    """The front as the search command prints it."""
    rows = [f"{'trial':>5}  {'method':<7} {'complied':>8} {'refused':>7} {'broken':>6} {'KL':>8}"]
    rows += [
        f"{p.trial:>5}  {p.params.get('method', '?'):<7} {p.complied:>5}/{p.prompts:<2} {p.refused!s:>7} "
        f"{p.broken!s:>6} {p.kl:>8.4f}"
        for p in front
    ]
    return "\n".join(rows)


def front_svg(study: Any, n: int) -> str:
    """All finished trials and the Pareto front, complied against KL."""
    import optuna

    from refusal_lab.core.plots import line_plot_svg

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = S.pareto(study)
    return line_plot_svg(
        "Search: harmful prompts complied with against KL",
        "first-token KL",
        f"complied (of {n})",
        {
            "trials": ([t.values[1] for t in done], [n - t.values[0] for t in done]),
            "Pareto front": ([t.values[1] for t in front], [n - t.values[0] for t in front]),
        },
        lines=False,
    )
