"""Self-contained SVG charts (no plotting library, no network): lines, scatter, grouped bars."""

from __future__ import annotations


def markdown_html(md: str) -> str:
    """The subset of markdown refusal-lab writes (headings, pipe tables, paragraphs) as HTML."""
    import html

    out: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
            out.append("</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):
                table.append(cells)
            continue
        flush()
        level = len(line) - len(line.lstrip("#"))
        if level and line[level : level + 1] == " ":
            out.append(f"<h{level + 1}>{html.escape(line[level + 1 :])}</h{level + 1}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
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
