"""The demo: the whole loop on the organism, as one stage function.

organism -> probe -> ablate (SABER, Arditi) -> evaluate the edits -> harden -> prove base vs hardened
-> one report. The organism is loaded once: exports leave it unedited, and the evaluation and
the proof reuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from refusal_lab.ablate.stage import run_ablate
from refusal_lab.config import Settings
from refusal_lab.core.artifacts import Log
from refusal_lab.core.sources import Source
from refusal_lab.evaluate.report import headline_table
from refusal_lab.evaluate.runner import evaluate_models
from refusal_lab.organism.source import load_model
from refusal_lab.probe.stage import run_probe, write_probe

METHODS = ("saber", "arditi")


def run_demo(s: Settings, out: Path, log: Log, echo: Callable[[str], None] = print) -> int:
    """Run the loop into `out` (its sub-folders are replaced); returns the exit code (3: judge failed)."""
    from refusal_lab.harden.stage import run_harden
    from refusal_lab.prove.report import HEAD, headline_rows
    from refusal_lab.prove.stage import run_prove

    s = s.model_copy(deep=True)
    s.model.path = "organism"
    m = load_model(s)
    base = str(m.source)
    sets = Source.of(m.source).probe_sets(s.prompts)
    steps = 4 + len(METHODS)  # probe, the ablations, evaluate, harden, prove
    log(f"[1/{steps}] probe")
    probe = run_probe(m, sets, s.probe, s.batch_size, s.cache_dir / "activations", log)
    write_probe(out / "probe", probe, m, s, sets, force=True)
    for i, method in enumerate(METHODS, 2):
        log(f"[{i}/{steps}] ablate --method {method}")
        sm = s.model_copy(deep=True)
        sm.ablate.method = method
        run_ablate(m, sm, out / f"organism-{method}", out / "probe" if method == "saber" else None, True, log)
    log(f"[{steps - 2}/{steps}] evaluate the edits")
    names = [base, *(str(out / f"organism-{method}") for method in METHODS)]
    outcome = evaluate_models(names, s, base, out / "eval", out / "probe", True, log, {base: m})
    echo(headline_table(outcome.rows))
    for r in outcome.results:  # a sample conversation per model
        row = r.harmful.rows[0]
        echo(f"  [{r.model}] user: {row.prompt}\n      assistant: {row.response}   [{row.label}]")
    log(f"[{steps - 1}/{steps}] harden")
    hardened = out / "organism-hardened"
    run_harden(load_model(s), s, hardened, True, log)  # a fresh copy: training changes the weights it holds
    log(f"[{steps}/{steps}] prove base vs hardened")
    results = run_prove([base, str(hardened)], s, None, out / "prove", True, log)
    rows = headline_rows(results, str(s.prove.budget_kl))
    echo("\n" + "  ".join(HEAD))
    for r in rows:
        echo("  ".join(r))
    echo(f"\nopen {out / 'eval' / 'report.html'} and {out / 'prove' / 'report.html'}")
    return 3 if outcome.judge_failed else 0
