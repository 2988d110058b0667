"""Prove's tables and page: the published before/after shape, per-attack rows, retained-vs-KL curves."""

from __future__ import annotations

from typing import Any

from refusal_lab.evaluate.plots import line_plot_svg, markdown_html


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.1%}"


def _ci(o: dict, key: str) -> str:
    lo, hi = o.get(f"{key}_ci", (None, None))
    return f"{_pct(o.get(f'{key}_rate'))} [{_pct(lo)}, {_pct(hi)}]"


def headline_rows(results: dict, budget: str) -> list[list[str]]:
    """The published table's shape: before, after the worst attack, drop, retained."""
    rows = []
    for m in results["models"]:
        b, w = m["before"], m["worst"].get(budget)
        if w is None:
            rows.append([m["model"], _pct(b["refused_rate"]), "no attack fits", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                m["model"],
                _pct(b["refused_rate"]),
                _pct(w["refused_rate"]),
                f"{(b['refused_rate'] - w['refused_rate']) * 100:.1f} pts",
                _pct(w["retained"]),
                w["attack"],
                f"{_pct(w['complied_rate'])} complied, {_pct(w['broken_rate'])} broken, KL {w['kl']:.3f}",
            ]
        )
    return rows


HEAD = ["model", "refused before", "refused after worst", "drop", "retained", "worst attack", "worst attack's effect"]


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def attack_rows(m: dict, budget: str, threat: str = "directional") -> list[list[str]]:
    rows = []
    for name, a in m["attacks"].items():
        if a["threat"] != threat:
            continue
        o = a["budgets"].get(budget, {})
        if not o.get("fits"):
            least = o.get("min_kl")
            rows.append(
                [name, "no setting fits", "-", "-", "-", f"least KL {least:.3f}" if least is not None else "-", "-"]
            )
            continue
        cap = ", ".join(f"{k} {_pct(v)}" for k, v in (o.get("capability") or {}).items()) or "-"
        setting = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in o["setting"].items())
        rows.append([name, _ci(o, "refused"), _ci(o, "complied"), _ci(o, "broken"), f"{o['kl']:.4f}", cap, setting])
    return rows


def other_rows(m: dict) -> list[list[str]]:
    """Weight-delta and fine-tuning attacks: one row per setting, no budget."""
    rows = []
    for name, a in m["attacks"].items():
        if a["threat"] in ("directional", "imported"):
            continue
        for o in a["budgets"].values():
            s = o["setting"]
            what = (
                f"lambda={s['lambda']}"
                if name == "delta"
                else f"{s['examples']} examples, broke at step {s['steps_to_break']}"
                if s.get("steps_to_break")
                else f"{s['examples']} examples, not broken in {s['steps']} steps"
            )
            rows.append(
                [
                    name,
                    what,
                    _pct(o["refused_rate"]),
                    _pct(o["complied_rate"]),
                    _pct(o["broken_rate"]),
                    f"{o['kl']:.4f}",
                ]
            )
    return rows


def summary_md(results: dict) -> str:
    budgets = sorted({k for m in results["models"] for k in m["worst"]}, key=float)
    out = ["# refusal-lab prove", ""]
    for b in budgets:
        out += [f"## Worst case over the directional attacks, first-token KL <= {b}", ""]
        out += [*_md(HEAD, headline_rows(results, b)), ""]
    for m in results["models"]:
        bf = m["before"]
        cap = ", ".join(f"{k} {_pct(v)}" for k, v in (bf.get("capability") or {}).items()) or "-"
        head = f"before: refused {_ci(bf, 'refused')}, complied {_ci(bf, 'complied')}, "
        head += f"over-refusal {_pct(bf.get('overrefusal_refused'))}, {cap}, DCS {bf.get('dcs')}"
        out += [f"## {m['model']}", "", head, ""]
        for b in budgets:
            out += [f"### KL <= {b} (rates with Wilson 95% intervals)", ""]
            out += [
                *_md(["attack", "refused", "complied", "broken", "KL", "capability", "setting"], attack_rows(m, b)),
                "",
            ]
            imported = attack_rows(m, b, "imported")
            if imported:
                out += ["Attacked copies imported from other tools (not in the worst case):", ""]
                out += [*_md(["attack", "refused", "complied", "broken", "KL", "capability", "setting"], imported), ""]
            w = m["worst"].get(b)
            if w and "overrefusal_refused" in w:
                out += [f"after the worst attack ({w['attack']}): over-refusal {_pct(w['overrefusal_refused'])}, "
                        f"harmless refused {_pct(w['harmless_refused'])}, DCS {w.get('dcs')}", ""]  # fmt: skip
        other = other_rows(m)
        if other:
            out += ["### Other threat models (no drift budget)", ""]
            out += [*_md(["attack", "setting", "refused", "complied", "broken", "KL"], other), ""]
        if m.get("judge_failed"):
            out += [f"judge failed part-way; later labels by the model-free scorer: {m['judge_failed']}", ""]
    return "\n".join(out)


def _curves(m: dict) -> str:
    """Retained refusal (tuning prompts) against KL, one series per attack, and the adaptive phases."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for name, a in m["attacks"].items():
        before = max(1, a.get("tuning_refused") or 0)
        pts = sorted((t["kl"], t["tuning_refused"] / before) for t in a["tried"] if t.get("tuning_refused") is not None)
        if pts:
            series[name] = ([x for x, _ in pts], [y for _, y in pts])
    figs = [
        line_plot_svg(
            f"{m['model']}: refusals retained against KL", "first-token KL", "retained (tuning)", series, lines=False
        )
    ]
    adaptive = m["attacks"].get("adaptive", {})
    phases = [t for t in adaptive.get("tried", []) if t.get("tuning_complied") is not None]
    if phases:
        n = max(1, adaptive.get("tuning_n") or 1)
        xs = [t["phase"] for t in phases]
        figs.append(
            line_plot_svg(
                f"{m['model']}: adaptive re-extraction",
                "phase",
                "share of tuning prompts",
                {"complied": (xs, [t["tuning_complied"] / n for t in phases]), "KL": (xs, [t["kl"] for t in phases])},
            )
        )
    return "".join(figs)


def report_html(results: dict[str, Any]) -> str:
    """One self-contained page (inline SVG, no scripts, no network)."""
    body = markdown_html(summary_md(results).split("\n", 1)[1])  # its title is the page's
    figs = "".join(_curves(m) for m in results["models"])
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
