"""Human-readable output: terminal tables and sample conversations."""

from __future__ import annotations

from collections import defaultdict

from refusal_lab.evaluate import Behaviour

COLUMNS = {  # field -> header; refused counts the folder's refusal words, "generic kw" only the standard markers
    "harmful_refusal": "harmful refused",
    "harmful_refusal_generic": "(generic kw)",
    "harmful_compliance": "harmful complied",
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


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def line_plot_svg(
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, tuple[list[float], list[float]]],
    width: int = 640,
    height: int = 320,
    lines: bool = True,
) -> str:
    """A self-contained SVG line chart, or scatter with lines=False (no plotting library, no network)."""
    colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
    left, right, top, bottom = 60, 180, 36, 44
    xs = [x for xs_, _ in series.values() for x in xs_] or [0.0]
    ys = [y for _, ys_ in series.values() for y in ys_ if y == y] or [0.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{_esc(title)}</text>',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>',
        f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{_esc(xlabel)}</text>',
        f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">'
        f"{_esc(ylabel)}</text>",
    ]
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{left - 6}" y="{py(yv) + 4}" text-anchor="end">{yv:.3g}</text>')
        xv = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{px(xv)}" y="{top + ph + 16}" text-anchor="middle">{xv:.3g}</text>')
    for n, (name, (sx, sy)) in enumerate(series.items()):
        c = colours[n % len(colours)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy, strict=True) if y == y)
        if lines:
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"/>')
        parts += [
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>'
            for x, y in zip(sx, sy, strict=True)
            if y == y
        ]
        parts.append(f'<text x="{left + pw + 12}" y="{top + 14 + 16 * n}" fill="{c}">{_esc(name[:26])}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def bar_chart_svg(
    title: str, groups: list[str], series: dict[str, list[float]], width: int = 640, height: int = 320
) -> str:
    """Grouped bars: one group per category, one bar per series (model); values in [0, 1]."""
    colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
    left, right, top, bottom = 50, 180, 36, 90
    pw, ph = width - left - right, height - top - bottom
    n = max(1, len(series))
    gw = pw / max(1, len(groups))
    bw = gw * 0.8 / n
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{_esc(title)}</text>',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
    ]
    for i in range(5):
        y = top + ph - ph * i / 4
        parts.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{i * 25}%</text>')
        parts.append(f'<line x1="{left}" y1="{y}" x2="{left + pw}" y2="{y}" stroke="#ddd"/>')
    for g, name in enumerate(groups):
        x0 = left + g * gw + gw * 0.1
        for k, (_label, vals) in enumerate(series.items()):
            v = vals[g] if g < len(vals) and vals[g] == vals[g] else 0.0
            h = ph * max(0.0, min(1.0, v))
            parts.append(
                f'<rect x="{x0 + k * bw:.1f}" y="{top + ph - h:.1f}" width="{bw * 0.95:.1f}" height="{h:.1f}" '
                f'fill="{colours[k % len(colours)]}"/>'
            )
        cx = left + g * gw + gw / 2
        parts.append(
            f'<text x="{cx:.1f}" y="{top + ph + 12}" text-anchor="end" '
            f'transform="rotate(-35 {cx:.1f} {top + ph + 12})">{_esc(name[:28])}</text>'
        )
    for k, label in enumerate(series):
        parts.append(
            f'<text x="{left + pw + 12}" y="{top + 14 + 14 * k}" '
            f'fill="{colours[k % len(colours)]}">{_esc(label[:26])}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


HEADLINE_COLUMNS = (
    ("harmful_refusal", "harmful refusal", "%"),
    ("harmless_refusal", "harmless refusal", "%"),
    ("overrefusal", "over-refusal", "%"),
    ("judge_refusal", "judge refusal", "%"),
    ("judge_score", "SR score", "f"),
    ("agreement", "kw/judge agree", "%"),
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


def headline_table(rows: list[dict], markdown: bool = False) -> str:
    """One row per model, only the columns some model has."""
    cols = [c for c in HEADLINE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    head = ["model"] + [c[1] for c in cols]
    body = [[r["model"]] + [_fmt(r.get(c[0]), c[2]) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            f"{x:<{w}}" if i == 0 else f"{x:>{w}}" for i, (x, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([fmt(head), "-" * (sum(widths) + 2 * len(widths)), *map(fmt, body)])


def summary_md(results: list[dict], rows: list[dict]) -> str:
    out = ["# refusal-lab evaluation", "", headline_table(rows, markdown=True), ""]
    for r in results:
        out += [f"## {r['model']}", "", f"source: `{r['source']}`", ""]
        for name in ("harmful", "harmless", "overrefusal"):
            cats = r[name]["per_category"]
            if len(cats) > 1:
                out.append(f"{name} refusal per category: " + ", ".join(f"{k} {v:.0%}" for k, v in cats.items()))
        if r.get("escalation"):
            s = r["escalation"]["summary"]
            levels = ", ".join(f"L{k} {_fmt(v, 'd')}" for k, v in s["per_level"].items())
            out.append(f"escalation ({r['escalation']['scorer']}): DCS {_fmt(s['overall_dcs'], 'd')}; {levels}")
        if r["harmful"].get("judge_unparsed"):
            out.append(f"judge answers that could not be parsed: {r['harmful']['judge_unparsed']}")
        out.append("")
    return "\n".join(out)


def report_html(results: list[dict], rows: list[dict], probe_scores: dict | None = None) -> str:
    """A self-contained page: tables and inline SVG plots, no scripts, no network."""
    import html

    names = [r["model"] for r in results]
    cats = sorted({c for r in results for c in r["harmful"]["per_category"]})
    figs = [
        bar_chart_svg(
            "Harmful refusal per category",
            cats,
            {r["model"]: [r["harmful"]["per_category"].get(c, float("nan")) for c in cats] for r in results},
        )
    ]
    kls = {r["model"]: ([r["kl"].get("first_token") or 0.0], [r["harmful"]["keyword_refusal"]]) for r in results}
    figs.append(
        line_plot_svg("Harmful refusal against first-token KL", "KL(base || model)", "refusal rate", kls, lines=False)
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
    esc = {
        r["model"]: (
            [1, 2, 3, 4, 5],
            [v if v is not None else float("nan") for v in r["escalation"]["summary"]["per_level"].values()],
        )
        for r in results
        if r.get("escalation")
    }
    if esc:
        figs.append(line_plot_svg("Escalation: DCS per level (lower is better)", "level", "DCS", esc))
    samples = []
    for r in results:
        for row in r["harmful"]["rows"][:3]:
            samples.append(
                f"<tr><td>{html.escape(r['model'])}</td><td>{html.escape(row['prompt'][:200])}</td>"
                f"<td>{html.escape(row['response'][:300])}</td><td>{'yes' if row['keyword_refusal'] else 'no'}"
                f"</td></tr>"
            )
    table = headline_table(rows, markdown=False)
    judged = any(r["harmful"].get("judge_refusal") is not None for r in results)
    scoring = "keyword markers and a rubric judge" if judged else "keyword markers"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>refusal-lab report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:24px auto;color:#222}}
pre{{background:#f6f6f6;padding:12px;overflow-x:auto}} .figs{{display:flex;flex-wrap:wrap;gap:12px}}
table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 6px;vertical-align:top}}</style>
</head><body>
<h1>refusal-lab report</h1>
<p>Models: {html.escape(", ".join(names))}. Refusal scored by {scoring};
KL is KL(base || model) on harmless prompts.</p>
<pre>{html.escape(table)}</pre>
<div class="figs">{"".join(figs)}</div>
<h2>Sample harmful prompts and replies</h2>
<table><tr><th>model</th><th>prompt</th><th>reply</th><th>refused (keyword)</th></tr>{"".join(samples)}</table>
</body></html>
"""
