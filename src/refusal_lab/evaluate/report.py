"""Human-readable output: terminal tables and sample conversations."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from refusal_lab.core.metrics import Behaviour
from refusal_lab.core.plots import bar_chart_svg, line_plot_svg, markdown_html
from refusal_lab.evaluate.results import Evaluation, Headline, ModelEval

COLUMNS = {  # field -> header; refused counts the folder's refusal words, "generic kw" only the standard markers
    "harmful_refusal": "harmful refused",
    "harmful_refusal_generic": "(generic kw)",
    "harmful_compliance": "harmful complied",
    "harmful_broken": "harmful broken",
    "harmless_refusal": "harmless refused",
    "harmless_compliance": "harmless complied",
    "capability": "capability",
    "recognition": "recognition",
}


def behaviour_table(rows: dict[str, Behaviour]) -> str:
    """A fixed-width table, one row per model, percentages on the held-out eval prompts."""
    name_w = max(12, *(len(n) for n in rows))
    cols = [c for c in COLUMNS if any(c in b.as_dict() for b in rows.values())]
    width = {c: max(7, len(COLUMNS[c])) for c in cols}
    with_kl = any(b.kl is not None for b in rows.values())
    head = f"{'model':<{name_w}}  " + "  ".join(f"{COLUMNS[c]:>{width[c]}}" for c in cols)
    head += f"  {'KL to base':>10}" if with_kl else ""
    lines = [head, "-" * len(head)]
    for name, b in rows.items():
        vals = b.as_dict()
        cells = [f"{vals[c]:>{width[c]}.1%}" if c in vals else " " * width[c] for c in cols]
        line = f"{name:<{name_w}}  " + "  ".join(cells)
        lines.append(line + (f"  {b.kl:>10.4f}" if b.kl is not None else f"  {'':>10}" if with_kl else ""))
    return "\n".join(lines)


def sample_lines(samples: dict[str, list[tuple[str, str]]], per_set: int = 2) -> str:
    out = []
    for name, convs in samples.items():
        out.append(f"\n[{name}]")
        for prompt, reply in convs[:per_set]:
            out.append(f"  user:      {prompt}\n  assistant: {reply}")
    return "\n".join(out)


HEADLINE_COLUMNS = (  # Headline field (or capability_<name>) -> header, format
    ("harmful_refused", "harmful refused", "%"),
    ("harmful_complied", "complied", "%"),
    ("harmful_broken", "broken", "%"),
    ("harmful_keyword", "(keyword)", "%"),
    ("harmless_refused", "harmless refused", "%"),
    ("overrefusal", "over-refusal", "%"),
    ("judge_refused", "judge refused", "%"),
    ("judge_score", "SR score", "f"),
    ("agreement", "judge agrees", "%"),
    ("kl_first_token", "KL first", "f"),
    ("kl_teacher_forced", "KL tf", "f"),
    ("capability_capability", "capability", "%"),
    ("capability_recognition", "recognition", "%"),
    ("capability_multiple_choice", "MC accuracy", "%"),
    ("dcs", "DCS", "d"),
)


def _fmt(v: object, kind: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.1%}" if kind == "%" else f"{v:.4f}" if kind == "f" else f"{v:.1f}"


def headline_table(rows: Sequence[Headline], markdown: bool = False) -> str:
    """One row per model, only the columns some model has (harness tasks after the fixed ones)."""
    known = {c[0] for c in HEADLINE_COLUMNS}
    extra = sorted({f"capability_{k}" for r in rows for k in r.capability} - known)
    cols = [c for c in HEADLINE_COLUMNS if any(r.value(c[0]) is not None for r in rows)]
    cols += [(k, k.removeprefix("capability_"), "%") for k in extra]
    head = ["model"] + [c[1] for c in cols]
    body = [[r.model] + [_fmt(r.value(c[0]), c[2]) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            f"{x:<{w}}" if i == 0 else f"{x:>{w}}" for i, (x, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([fmt(head), "-" * (sum(widths) + 2 * len(widths)), *map(fmt, body)])


def judge_line(r: ModelEval) -> str | None:
    """What the judge made of the harmful replies, beside the model-free scorer, or None without a judge."""
    j = r.harmful.judge
    if j is None:
        return None
    agree = f"agrees with the {j.agreed_with} labels on {_fmt(j.agreement, '%')}"
    return f"judge: refused {_fmt(j.refused, '%')}, {agree}; answers that could not be parsed: {j.unparsed}"


def summary_md(ev: Evaluation) -> str:
    out = ["# refusal-lab evaluation", "", headline_table(ev.rows, markdown=True), ""]
    for r in ev.models:
        out += [f"## {r.model}", "", f"source: `{r.source}`", ""]
        for name in ("harmful", "harmless", "overrefusal"):
            cats = getattr(r, name).per_category
            if len(cats) > 1:
                out.append(f"{name} refusal per category: " + ", ".join(f"{k} {v:.0%}" for k, v in cats.items()))
        if r.escalation:
            s = r.escalation.summary
            levels = ", ".join(f"L{k} {_fmt(v, 'd')}" for k, v in s.per_level.items())
            out.append(f"escalation ({r.escalation.scorer}): DCS {_fmt(s.overall_dcs, 'd')}; {levels}")
        judged = judge_line(r)
        if judged:
            out.append(judged)
        out.append("")
    return "\n".join(out)


def _figures(ev: Evaluation, probe_scores: dict | None) -> list[str]:
    cats = sorted({c for r in ev.models for c in r.harmful.per_category})
    figs = [
        bar_chart_svg(
            "Harmful refusal per category",
            cats,
            {r.model: [r.harmful.per_category.get(c, float("nan")) for c in cats] for r in ev.models},
        )
    ]
    kls = {  # a model evaluated without a base has no KL: it is left out, not drawn at 0
        r.model: ([r.kl.first_token], [r.harmful.complied]) for r in ev.models if r.kl.first_token is not None
    }
    if kls:
        figs.append(
            line_plot_svg("Harmful complied against first-token KL", "KL(base || model)", "complied", kls, lines=False)
        )
    if probe_scores:
        per_layer: dict[int, float] = defaultdict(float)
        for d in probe_scores["directions"]:
            per_layer[d["layer"]] = max(per_layer[d["layer"]], d["fdr"])
        layers = sorted(per_layer)
        figs.append(
            line_plot_svg(
                "Fisher separability per layer (probe)",
                "layer",
                "FDR of the top direction",
                {"FDR": (layers, [per_layer[x] for x in layers])},
            )
        )
    nan = float("nan")
    esc = {
        r.model: ([1, 2, 3, 4, 5], [nan if v is None else v for v in r.escalation.summary.per_level.values()])
        for r in ev.models
        if r.escalation
    }
    if esc:
        figs.append(line_plot_svg("Escalation: DCS per level (lower is better)", "level", "DCS", esc))
    return figs


def report_html(ev: Evaluation, probe_scores: dict | None = None) -> str:
    """A self-contained page: tables and inline SVG plots, no scripts, no network."""
    import html

    names = [r.model for r in ev.models]
    samples = []
    for r in ev.models:
        for row in r.harmful.rows[:3]:
            samples.append(
                f"<tr><td>{html.escape(r.model)}</td><td>{html.escape(row.prompt[:200])}</td>"
                f"<td>{html.escape(row.response[:300])}</td><td>{row.label}</td></tr>"
            )
    table = markdown_html(headline_table(ev.rows, markdown=True))  # a real table: it wraps instead of clipping
    judged = [f"<p>{html.escape(r.model)}: {html.escape(line)}</p>" for r in ev.models if (line := judge_line(r))]
    scorer = ev.models[0].harmful.scorer if ev.models else "keyword"
    scoring = f"the {scorer} scorer" + (" and a rubric judge" if judged else "")
    notes = "".join(judged)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>refusal-lab report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:24px auto;color:#222}}
pre{{background:#f6f6f6;padding:12px;overflow-x:auto}} .figs{{display:flex;flex-wrap:wrap;gap:12px}}
table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 6px;vertical-align:top}} th{{background:#f2f2f2}}</style>
</head><body>
<h1>refusal-lab report</h1>
<p>Models: {html.escape(", ".join(names))}. Replies labelled refused / complied / broken by {scoring};
KL is KL(base || model) on harmless prompts.</p>
{table}
{notes}
<div class="figs">{"".join(_figures(ev, probe_scores))}</div>
<h2>Sample harmful prompts and replies</h2>
<table><tr><th>model</th><th>prompt</th><th>reply</th><th>label</th></tr>{"".join(samples)}</table>
</body></html>
"""
