"""The demo: the whole attack loop on the organism, as one stage function.

organism -> probe -> ablate (SABER, Arditi) -> evaluate all three against the base -> report.
The organism is loaded once: exports leave it unedited, and the evaluation reuses it as the base.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from refusal_lab.ablate.stage import run_ablate
from refusal_lab.config import Settings
from refusal_lab.core.artifacts import Log
from refusal_lab.core.sources import Source, load_model
from refusal_lab.evaluate.report import headline_table
from refusal_lab.evaluate.runner import evaluate_models
from refusal_lab.probe.stage import run_probe, write_probe

METHODS = ("saber", "arditi")


def run_demo(s: Settings, out: Path, log: Log, echo: Callable[[str], None] = print) -> int:
    """Run the loop into `out` (its sub-folders are replaced); returns the exit code (3: judge failed)."""
    s = s.model_copy(deep=True)
    s.model.path = "organism"
    m = load_model(s)
    sets = Source.of(m.source).probe_sets(s.prompts)
    steps = 2 + len(METHODS)
    log(f"[1/{steps}] probe")
    probe = run_probe(m, sets, s.probe, s.batch_size, s.cache_dir / "activations", log)
    write_probe(out / "probe", probe, m, s, sets, force=True)
    for i, method in enumerate(METHODS, 2):
        log(f"[{i}/{steps}] ablate --method {method}")
        sm = s.model_copy(deep=True)
        sm.ablate.method = method
        run_ablate(m, sm, out / f"organism-{method}", out / "probe" if method == "saber" else None, True, log)
    log(f"[{steps}/{steps}] evaluate")
    names = [str(m.source), *(str(out / f"organism-{method}") for method in METHODS)]
    outcome = evaluate_models(names, s, str(m.source), out / "eval", out / "probe", True, log, {str(m.source): m})
    echo(headline_table(outcome.rows))
    for r in outcome.results:  # a few sample conversations per model
        echo(f"\n[{r['model']}]")
        for row in r["harmful"]["rows"][:1] + r["harmless"]["rows"][:1]:
            echo(f"  user:      {row['prompt']}\n  assistant: {row['response']}   [{row['label']}]")
    echo(f"\nopen {out / 'eval' / 'report.html'}")
    return 3 if outcome.judge_failed else 0
