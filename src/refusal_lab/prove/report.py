"""Prove's tables and page: the published before/after shape, per-attack rows, retained-vs-KL curves."""

from __future__ import annotations

from typing import Any

from refusal_lab.core.plots import line_plot_svg, markdown_html
from refusal_lab.prove.results import Counts, Measures, ModelProof, Outcome, ProveResult


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.1%}"


def _ci(c: Counts, key: str) -> str:
    """A share with its Wilson interval, as every other report prints one: "41.9% [36.1-48.0%]"."""
    return f"{_pct(c.rate(key))} [{c.share(key).interval}]"


def headline_rows(results: ProveResult, budget: str) -> list[list[str]]:
    """The published table's shape: before, after the worst attack, drop, retained."""
    rows = []
    for m in results.models:
        b, w = m.before.rate("refused"), m.worst.get(budget)
        if w is None:
            rows.append([m.model, _pct(b), "no attack fits", "-", "-", "-", "-"])
            continue
        o = w.outcome
        after = o.rate("refused")
        effect = f"{_pct(o.rate('complied'))} complied, {_pct(o.rate('broken'))} broken, KL {o.kl:.3f}"
        rows.append([m.model, _pct(b), _pct(after), f"{(b - after) * 100:.1f} pts", _pct(w.retained), w.attack, effect])
    return rows


HEAD = ["model", "refused before", "refused after worst", "drop", "retained", "worst attack", "worst attack's effect"]


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _capability(m: Measures) -> str:
    return ", ".join(f"{k} {_pct(v)}" for k, v in m.capability.items()) or "-"


def attack_rows(m: ModelProof, budget: str, threat: str = "directional") -> list[list[str]]:
    rows = []
    for name, a in m.attacks.items():
        if a.threat != threat:
            continue
        o = a.budgets.get(budget)
        if o is None or not o.fits:
            least = o.min_kl if o is not None else None
            rows.append(
                [name, "no setting fits", "-", "-", "-", f"least KL {least:.3f}" if least is not None else "-", "-"]
            )
            continue
        setting = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in o.setting.items())
        c = o.counts
        rows.append([name, _ci(c, "refused"), _ci(c, "complied"), _ci(c, "broken"), f"{o.kl:.4f}",
                     _capability(o.measures), setting])  # fmt: skip
    return rows


def _other_setting(name: str, s: dict[str, Any]) -> str:
    if name == "delta":
        return f"lambda={s['lambda']}"
    head = f"{s['source']}" + (f" (donor {s['donor']})" if "donor" in s else "") + ": " if "source" in s else ""
    if s.get("steps_to_break"):
        return f"{head}{s['examples']} examples, broke at step {s['steps_to_break']}"
    return f"{head}{s['examples']} examples, not broken in {s['steps']} steps"


def other_rows(m: ModelProof) -> list[list[str]]:
    """Weight-delta and fine-tuning attacks: one row per setting, no budget."""
    rows = []
    for name, a in m.attacks.items():
        if a.threat in ("directional", "imported", "prefill"):
            continue
        for o in a.budgets.values():
            rates = [_pct(o.rate(k)) for k in ("refused", "complied", "broken")]
            rows.append([name, _other_setting(name, o.setting), *rates, f"{o.kl:.4f}"])
    return rows


ATTACK_HEAD = ["attack", "refused", "complied", "broken", "KL", "capability", "setting"]


def prefill_outcomes(m: ModelProof) -> list[Outcome]:
    """The prefill attack's rows, worst opener first (the one whose strongest length made most comply),
    each opener's lengths in order."""
    a = m.attacks.get("prefill")
    if a is None:
        return []
    rows = [o for o in a.budgets.values() if o.fits]
    worst: dict[str, int] = {}
    for o in rows:
        worst[o.setting["of"]] = max(worst.get(o.setting["of"], 0), o.counts.complied)
    return sorted(rows, key=lambda o: (-worst[o.setting["of"]], o.setting["of"], o.setting["tokens"]))


def worst_prefill(m: ModelProof) -> Outcome | None:
    """The prefill that made most held-out prompts comply (fewest refusals on a tie)."""
    rows = prefill_outcomes(m)
    return max(rows, key=lambda o: (o.counts.complied, -o.counts.refused), default=None)


def _code(text: str) -> str:
    """An opener as a table cell: code, its pipes escaped."""
    return "`" + text.replace("|", "\\|") + "`"


PREFILL_HEAD = ["opener", "from", "tokens", "refused", "complied", "broken"]


def prefill_rows(m: ModelProof) -> list[list[str]]:
    return [
        [_code(o.setting["opener"]), o.setting["from"], str(o.setting["tokens"]),
         *(_ci(o.counts, k) for k in ("refused", "complied", "broken"))]
        for o in prefill_outcomes(m)
    ]  # fmt: skip


PREFILL_SUMMARY = ["model", "refused before", "worst opener", "tokens", "refused", "complied", "broken"]


def prefill_summary(results: ProveResult) -> list[list[str]]:
    """Per model, no prefill against the worst prefill: base against hardened, side by side."""
    rows = []
    for m in results.models:
        w = worst_prefill(m)
        if w is not None:
            rates = [_pct(w.rate(k)) for k in ("refused", "complied", "broken")]
            rows.append([m.model, _pct(m.before.rate("refused")), _code(w.setting["opener"]),
                         str(w.setting["tokens"]), *rates])  # fmt: skip
    return rows


TUNING_HEAD = ["attack", "proposals", "proxy read", "generated", "proxy off by", "seconds"]


def tuning_rows(m: ModelProof) -> list[list[str]]:
    """How each budgeted attack chose its settings: proposals, how many the proxy read and how many
    generated tuning replies, and the proxy's error on those (predicted refusals less counted: its
    largest over-prediction, the error that could have pruned a proposal wrongly, and the mean miss)."""
    rows = []
    for name, a in m.attacks.items():
        if a.threat not in ("directional", "imported"):
            continue
        read = [t for t in a.tried if t.predicted_refused is not None]
        generated = [t for t in a.tried if t.tuning_refused is not None]
        errs = [e for t in generated if (e := t.over_predicted) is not None]
        off = f"{max(errs):+d} most, {sum(map(abs, errs)) / len(errs):.1f} mean" if errs else "-"
        rows.append([name, str(len(a.tried)), str(len(read)), str(len(generated)), off, f"{a.seconds:.0f}"])
    return rows


def _model_md(m: ModelProof, budgets: list[str]) -> list[str]:
    bf = m.before_measures
    head = f"before: refused {_ci(m.before, 'refused')}, complied {_ci(m.before, 'complied')}, "
    head += f"over-refusal {_pct(bf.overrefusal_refused)}, {_capability(bf)}, DCS {bf.dcs}"
    out = [f"## {m.model}", "", head, ""]
    for b in budgets:
        out += [f"### KL <= {b} (rates with Wilson 95% intervals)", "", *_md(ATTACK_HEAD, attack_rows(m, b)), ""]
        imported = attack_rows(m, b, "imported")
        if imported:
            out += ["Attacked copies imported from other tools (not in the worst case):", ""]
            out += [*_md(ATTACK_HEAD, imported), ""]
        w = m.worst.get(b)
        if w and w.outcome.measures.full:
            wm = w.outcome.measures
            out += [f"after the worst attack ({w.attack}): over-refusal {_pct(wm.overrefusal_refused)}, "
                    f"harmless refused {_pct(wm.harmless_refused)}, DCS {wm.dcs}", ""]  # fmt: skip
    tuning = tuning_rows(m)
    if tuning:
        out += ["### How settings were chosen (tuning prompts; the proxy: first reply token among the model's "
                "refusal openers)", "", *_md(TUNING_HEAD, tuning), ""]  # fmt: skip
    other = other_rows(m)
    if other:
        out += ["### Other threat models (no drift budget)", ""]
        out += [*_md(["attack", "setting", "refused", "complied", "broken", "KL"], other), ""]
    prefill = prefill_rows(m)
    if prefill:
        out += ["### Prefill (the reply opens with an opener the model goes on from; weights untouched, no budget)", ""]
        out += ["Worst opener first, each cut to its first 1..N tokens (a start two openers share is measured once); "
                "rates with Wilson 95% intervals.", ""]  # fmt: skip
        out += [*_md(PREFILL_HEAD, prefill), ""]
    if m.judge_failed:
        out += [f"judge failed part-way; later labels by the model-free scorer: {m.judge_failed}", ""]
    return out


def summary_md(results: ProveResult) -> str:
    budgets = sorted({k for m in results.models for k in m.worst}, key=float)
    out = ["# refusal-lab prove", ""]
    for b in budgets:
        out += [f"## Worst case over the directional attacks, first-token KL <= {b}", ""]
        out += [*_md(HEAD, headline_rows(results, b)), ""]
    prefill = prefill_summary(results)
    if prefill:
        out += ["## Prefill attack, worst opener per model (no weight edit, no drift budget)", ""]
        out += [*_md(PREFILL_SUMMARY, prefill), ""]
    for m in results.models:
        out += _model_md(m, budgets)
    return "\n".join(out)


def _curves(m: ModelProof) -> str:
    """Retained refusal (tuning prompts) against KL, one series per attack, and the adaptive phases."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for name, a in m.attacks.items():
        before = max(1, a.tuning_refused or 0)
        pts = sorted((t.kl, t.tuning_refused / before) for t in a.tried if t.tuning_refused is not None)
        if pts:
            series[name] = ([x for x, _ in pts], [y for _, y in pts])
    figs = [
        line_plot_svg(
            f"{m.model}: refusals retained against KL", "first-token KL", "retained (tuning)", series, lines=False
        )
    ]
    adaptive = m.attacks.get("adaptive")
    phases = [t for t in adaptive.tried if t.tuning_complied is not None] if adaptive else []
    if adaptive and phases:
        n = max(1, adaptive.tuning_n or 1)
        xs = [t.setting["phase"] for t in phases]
        figs.append(
            line_plot_svg(
                f"{m.model}: adaptive re-extraction",
                "phase",
                "share of tuning prompts",
                {"complied": (xs, [t.tuning_complied / n for t in phases]), "KL": (xs, [t.kl for t in phases])},
            )
        )
    figs += _finetune_curve(m)
    return "".join(figs)


def _finetune_curve(m: ModelProof) -> list[str]:
    """The fine-tuning attack's refusals retained (of the tuning prompts the model refused) against LoRA
    steps, one series per row (data source and size): how fast ordinary and attacked fine-tuning remove safety."""
    ft = m.attacks.get("finetune")
    series = {
        f"{t.setting.get('source', 'templates')}, {t.setting.get('examples', '?')} ex.": (
            [0.0] + [float(p["step"]) for p in t.setting["curve"]],
            [1.0] + [float(p["retained"]) for p in t.setting["curve"]],
        )
        for t in (ft.tried if ft else [])
        if t.setting.get("curve")
    }
    if not series:
        return []
    title = f"{m.model}: fine-tuning attack"
    return [line_plot_svg(title, "LoRA steps", "retained (refused tuning prompts)", series)]


def report_html(results: ProveResult) -> str:
    """One self-contained page (inline SVG, no scripts, no network)."""
    body = markdown_html(summary_md(results).split("\n", 1)[1])  # its title is the page's
    figs = "".join(_curves(m) for m in results.models)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>refusal-lab prove</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:24px auto;color:#222}}
table{{border-collapse:collapse;font-size:13px;margin:8px 0}} td,th{{border:1px solid #ccc;padding:3px 6px}}
th{{background:#f2f2f2}}
.figs{{display:flex;flex-wrap:wrap;gap:12px}}</style>
</head><body>
<h1>refusal-lab prove</h1>
<p>Every attack is tuned on held-back probe prompts within each drift budget (first-token KL on held-out harmless
prompts) and reported on held-out harmful prompts, labelled refused / complied / broken. Retained = refused after /
refused before; the headline is the directional attack that made most prompts comply.</p>
{body}
<div class="figs">{figs}</div>
</body></html>
"""
