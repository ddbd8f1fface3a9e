"""Inline SVG charts for the study report (`fedcare.report_html`): no script, no external reference.

Every chart is one `<svg data-chart="NAME">` element sized by its viewBox (it scales with the page),
with a `<title>` for screen readers. Data series are `<polyline class="series">` (lines) or
`<rect class="bar">` / `<circle class="point">` (bars, points); every text is escaped here.
Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies),
and line styles differ too, so a grey-scale print stays readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
INK, GRID, MUTED, TARGET = "#222222", "#e3e3e3", "#6b6b6b", "#B8002E"
DASHES = ("", "6 3", "2 3", "8 3 2 3", "4 4", "1 2")
WIDTH, HEIGHT = 520, 380
MARGIN = {"left": 58, "right": 16, "top": 34, "bottom": 50}


def _f(value: float) -> str:
    """A coordinate: 1 decimal is sub-pixel at these sizes."""
    return f"{value:.1f}"


def _tick_texts(values: Sequence[float]) -> list[str]:
    """Tick labels with as many decimals as the tick step needs (0.485, 0.49, 0.495 stay distinct)."""
    step = min((b - a for a, b in zip(values, values[1:])), default=1.0) or 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    decimals += 1 if round(step * 10**decimals, 6) % 1 else 0  # a 2.5 or 0.25 step needs one more
    return [f"{v:.{decimals}f}" for v in values]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


@dataclass
class Frame:
    """A plot area: data ranges mapped into the viewBox, with axes, grid and labels."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def left(self) -> float:
        return MARGIN["left"]

    @property
    def right(self) -> float:
        return self.width - MARGIN["right"]

    @property
    def top(self) -> float:
        return MARGIN["top"]

    @property
    def bottom(self) -> float:
        return self.height - MARGIN["bottom"]

    def x(self, value: float) -> float:
        lo, hi = self.x_range
        return self.left + (value - lo) / ((hi - lo) or 1) * (self.right - self.left)

    def y(self, value: float) -> float:
        lo, hi = self.y_range
        return self.bottom - (value - lo) / ((hi - lo) or 1) * (self.bottom - self.top)

    def axes(self, x_label: str, y_label: str, *, x_ticks: Sequence[float] | None = None,
             x_tick_text: Sequence[str] | None = None) -> list[str]:
        parts = []
        xs = list(x_ticks) if x_ticks is not None else nice_ticks(*self.x_range)
        labels = list(x_tick_text) if x_tick_text is not None else _tick_texts(xs)
        ys = nice_ticks(*self.y_range)
        for value, text in zip(ys, _tick_texts(ys)):
            y = self.y(value)
            parts.append(f'<line x1="{_f(self.left)}" y1="{_f(y)}" x2="{_f(self.right)}" y2="{_f(y)}" stroke="{GRID}"/>')
            parts.append(f'<text x="{_f(self.left - 6)}" y="{_f(y + 4)}" text-anchor="end" class="tick">{escape(text)}</text>')
        for value, text in zip(xs, labels):
            x = self.x(value)
            parts.append(f'<line x1="{_f(x)}" y1="{_f(self.top)}" x2="{_f(x)}" y2="{_f(self.bottom)}" stroke="{GRID}"/>')
            parts.append(f'<text x="{_f(x)}" y="{_f(self.bottom + 16)}" text-anchor="middle" class="tick">{escape(text)}</text>')
        parts.append(f'<rect x="{_f(self.left)}" y="{_f(self.top)}" width="{_f(self.right - self.left)}" '
                     f'height="{_f(self.bottom - self.top)}" fill="none" stroke="{INK}" stroke-width="1"/>')
        parts.append(f'<text x="{_f((self.left + self.right) / 2)}" y="{_f(self.height - 12)}" text-anchor="middle" '
                     f'class="axis-label">{escape(x_label)}</text>')
        mid = (self.top + self.bottom) / 2
        parts.append(f'<text x="16" y="{_f(mid)}" text-anchor="middle" transform="rotate(-90 16 {_f(mid)})" '
                     f'class="axis-label">{escape(y_label)}</text>')
        return parts

    def polyline(self, points: Sequence[tuple[float, float]], color: str, *, dash: str = "", width: float = 2.2,
                 label: str = "", css: str = "series") -> str:
        coords = " ".join(f"{_f(self.x(px))},{_f(self.y(py))}" for px, py in points)
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        name = f' data-label="{escape(label)}"' if label else ""
        return (f'<polyline class="{css}" points="{coords}" fill="none" stroke="{color}" stroke-width="{width}"'
                f' stroke-linejoin="round"{dashed}{name}/>')


def svg(name: str, title: str, body: list[str], *, width: int = WIDTH, height: int = HEIGHT) -> str:
    return (f'<svg data-chart="{escape(name)}" viewBox="0 0 {width} {height}" width="100%" role="img" '
            f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet"><title>{escape(title)}</title>'
            + "".join(body) + "</svg>")


def legend(frame: Frame, entries: Sequence[tuple[str, str, str]], *, corner: str = "bottom-right") -> list[str]:
    """(text, colour, dash) entries in a boxed legend inside the plot area."""
    if not entries:
        return []
    row, width = 17, min(max(len(text) for text, _, _ in entries) * 6.6 + 40, frame.right - frame.left - 8)
    height = row * len(entries) + 8
    x0 = frame.right - width - 6 if corner.endswith("right") else frame.left + 6
    y0 = frame.bottom - height - 6 if corner.startswith("bottom") else frame.top + 6
    parts = [f'<rect x="{_f(x0)}" y="{_f(y0)}" width="{_f(width)}" height="{_f(height)}" fill="#ffffff" '
             f'fill-opacity="0.92" stroke="{GRID}"/>']
    for i, (text, color, dash) in enumerate(entries):
        y = y0 + 4 + row * i + row / 2
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{_f(x0 + 6)}" y1="{_f(y)}" x2="{_f(x0 + 28)}" y2="{_f(y)}" stroke="{color}" '
                     f'stroke-width="2.4"{dashed}/>')
        parts.append(f'<text x="{_f(x0 + 34)}" y="{_f(y + 4)}" class="legend">{escape(text)}</text>')
    return parts


def legend_below(entries: Sequence[tuple[str, str, str]], top: float, left: float = MARGIN["left"]) -> list[str]:
    """A legend under the plot, one entry per row from `top` (the svg must be 18 px taller per entry)."""
    parts = []
    for k, (text, color, dash) in enumerate(entries):
        y = top + 18 * k + 4
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{_f(left)}" y1="{_f(y)}" x2="{_f(left + 24)}" y2="{_f(y)}" stroke="{color}" '
                     f'stroke-width="{8 if not dash else 2.4}"{dashed}/>')
        parts.append(f'<text x="{_f(left + 32)}" y="{_f(y + 4)}" class="legend">{escape(text)}</text>')
    return parts


def heading(text: str, width: int = WIDTH) -> str:
    return f'<text x="{_f(width / 2)}" y="20" text-anchor="middle" class="chart-title">{escape(text)}</text>'


# -- the report's charts ------------------------------------------------------------------------------


def roc_chart(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> str:
    """ROC curves: (legend text, fpr, tpr) each; the pooled curve first (drawn thickest)."""
    frame = Frame((0.0, 1.0), (0.0, 1.0))
    body = [heading("ROC curve")] + frame.axes("false positive rate (1 − specificity)", "true positive rate (sensitivity)")
    body.append(frame.polyline([(0, 0), (1, 1)], MUTED, dash="3 3", width=1, css="reference"))
    entries = []
    for i, (text, fpr, tpr) in enumerate(curves):
        color, dash = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)]
        body.append(frame.polyline(list(zip(fpr, tpr)), color, dash=dash, width=3 if i == 0 else 1.8, label=text))
        entries.append((text, color, dash))
    entries.append(("chance (AUC 0.5)", MUTED, "3 3"))
    return svg("roc", "ROC curve", body + legend(frame, entries))


def calibration_chart(table: Sequence[dict]) -> str:
    """Reliability diagram: observed rate against mean predicted risk per bin (point area ~ rows),
    the diagonal of perfect calibration, and the rows per bin as bars along the bottom."""
    frame = Frame((0.0, 1.0), (0.0, 1.0))
    body = [heading("Calibration (reliability diagram)")]
    body += frame.axes("predicted risk (mean per bin)", "observed rate of the outcome")
    most = max((int(b["rows"]) for b in table), default=1) or 1
    strip = (frame.bottom - frame.top) * 0.18  # the bin-size bars use the bottom 18% of the plot
    for b in table:
        p, rows = float(b["predicted"]), int(b["rows"])
        lo = math.floor(min(p, 0.9999) * 10) / 10
        h = strip * rows / most
        body.append(f'<rect class="bar" x="{_f(frame.x(lo) + 2)}" y="{_f(frame.bottom - h)}" '
                    f'width="{_f(frame.x(lo + 0.1) - frame.x(lo) - 4)}" height="{_f(h)}" fill="#cfd8e3">'
                    f'<title>{rows} rows with predicted risk {lo:.1f}–{lo + 0.1:.1f}</title></rect>')
        body.append(f'<text x="{_f(frame.x(lo + 0.05))}" y="{_f(frame.bottom - h - 3)}" text-anchor="middle" '
                    f'class="tick small">{rows}</text>')
    body.append(frame.polyline([(0, 0), (1, 1)], MUTED, dash="3 3", width=1, css="reference"))
    points = [(float(b["predicted"]), float(b["observed"])) for b in table]
    if points:
        body.append(frame.polyline(points, PALETTE[0], width=2.2, label="observed"))
    for b in table:
        r = 3 + 6 * math.sqrt(int(b["rows"]) / most)
        body.append(f'<circle class="point" cx="{_f(frame.x(float(b["predicted"])))}" '
                    f'cy="{_f(frame.y(float(b["observed"])))}" r="{_f(r)}" fill="{PALETTE[0]}" fill-opacity="0.85">'
                    f'<title>predicted {float(b["predicted"]):.3f}, observed {float(b["observed"]):.3f}, '
                    f'{int(b["rows"])} rows</title></circle>')
    entries = [("observed rate per bin (point area ~ rows)", PALETTE[0], "1 0"), ("perfect calibration", MUTED, "3 3"),
               ("rows per bin (bars, with counts)", "#cfd8e3", "")]
    return svg("calibration", "Calibration", body + legend_below(entries, HEIGHT),
               height=HEIGHT + 18 * len(entries) + 6)


def rounds_chart(name: str, title: str, y_label: str, rounds: Sequence[int], values: Sequence[float | None],
                 color: str, *, x_label: str = "training round", lines: Sequence[tuple[str, float]] = (),
                 tick_text: Sequence[str] | None = None) -> str:
    """One metric per training round (rounds without a value are gaps), with optional horizontal
    reference lines ((legend text, value) each: a budget, a baseline)."""
    known = [(r, v) for r, v in zip(rounds, values) if v is not None]
    lo_r, hi_r = (min(rounds), max(rounds)) if rounds else (1, 1)
    vs = [v for _, v in known] + [v for _, v in lines] or [0.0, 1.0]
    pad = max((max(vs) - min(vs)) * 0.15, 0.01)
    frame = Frame((lo_r - 0.5, hi_r + 0.5), (min(vs) - pad if lines == () else 0.0, max(vs) + pad))
    ticks = list(range(lo_r, hi_r + 1)) if hi_r - lo_r <= 12 else [int(t) for t in nice_ticks(lo_r, hi_r)]
    texts = [str(t) for t in ticks] if tick_text is None else [tick_text[t - lo_r] for t in ticks]
    body = [heading(title)] + frame.axes(x_label, y_label, x_ticks=ticks, x_tick_text=texts)
    entries = []
    for j, (text, value) in enumerate(lines):
        color_j, dash = (TARGET, "6 3") if j == 0 else (INK, "2 3")
        body.append(frame.polyline([(lo_r - 0.5, value), (hi_r + 0.5, value)], color_j, dash=dash, width=2,
                                   css="target"))
        entries.append((f"{text}: {value:g}", color_j, dash))
    if len(known) > 1:
        body.append(frame.polyline(known, color, label=title))
    for r, v in known:
        body.append(f'<circle class="point" cx="{_f(frame.x(r))}" cy="{_f(frame.y(v))}" r="4" fill="{color}">'
                    f'<title>{escape(x_label)} {r}: {v:.4f}</title></circle>')
    return svg(name, title, body + legend(frame, entries))


def epsilon_chart(bars: Sequence[tuple[str, float | None]], lines: Sequence[tuple[str, float]], *,
                  unknown_text: str = "not known here") -> str:
    """ε spent per site (horizontal bars) against budget lines ((legend text, ε) each); the legend sits
    below the axis, clear of the bars."""
    entries = [(f"{text}: ε {value:g}", TARGET if j == 0 else INK, "6 3" if j == 0 else "2 3")
               for j, (text, value) in enumerate(lines)]
    if any(v is not None for _, v in bars):
        entries.append(("ε spent", PALETTE[0], ""))
    plot_h = max(220, 36 * len(bars) + 20)
    height = MARGIN["top"] + plot_h + MARGIN["bottom"] + 18 * len(entries) + 6
    wide = Frame((0.0, 1.0), (0.0, 1.0), width=WIDTH, height=MARGIN["top"] + plot_h + MARGIN["bottom"])
    top = max([*(v for _, v in bars if v is not None), *(v for _, v in lines), 1e-9]) * 1.1
    wide.x_range = (0.0, top)
    left = 118  # room for the site names
    body = [heading("Privacy: ε spent per site", WIDTH)] + _epsilon_axes(wide, left)
    span = wide.right - left

    def x(v: float) -> float:
        return left + v / top * span

    slot = (wide.bottom - wide.top) / (len(bars) or 1)
    for i, (name, value) in enumerate(bars):
        mid = wide.top + slot * i + slot / 2
        label = name if len(name) <= 16 else name[:15] + "…"
        body.append(f'<text x="{_f(left - 6)}" y="{_f(mid + 4)}" text-anchor="end" class="tick">{escape(label)}</text>')
        if value is None:
            body.append(f'<text x="{_f(left + 8)}" y="{_f(mid + 4)}" class="tick muted">{escape(unknown_text)}</text>')
            continue
        bar_h = min(slot * 0.6, 26)
        body.append(f'<rect class="bar" x="{_f(left)}" y="{_f(mid - bar_h / 2)}" width="{_f(max(x(value) - left, 1))}" '
                    f'height="{_f(bar_h)}" fill="{PALETTE[0]}"><title>{escape(name)}: ε {value:.3f}</title></rect>')
        inside = x(value) - left > 50
        body.append(f'<text x="{_f(x(value) - 6 if inside else x(value) + 4)}" y="{_f(mid + 4)}" '
                    f'text-anchor="{"end" if inside else "start"}" class="tick" '
                    f'style="fill:{"#ffffff" if inside else INK}">{value:.2f}</text>')
    for (text, value), (_, color, dash) in zip(lines, entries):
        body.append(f'<line class="target" x1="{_f(x(value))}" y1="{_f(wide.top)}" x2="{_f(x(value))}" '
                    f'y2="{_f(wide.bottom)}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
    body += legend_below(entries, wide.height, left)
    return svg("epsilon", "Privacy budget", body, height=height)


def _epsilon_axes(frame: Frame, left: float) -> list[str]:
    parts = []
    top = frame.x_range[1]
    ticks = nice_ticks(0.0, top)
    for value, text in zip(ticks, _tick_texts(ticks)):
        x = left + value / top * (frame.right - left)
        parts.append(f'<line x1="{_f(x)}" y1="{_f(frame.top)}" x2="{_f(x)}" y2="{_f(frame.bottom)}" stroke="{GRID}"/>')
        parts.append(f'<text x="{_f(x)}" y="{_f(frame.bottom + 16)}" text-anchor="middle" class="tick">{escape(text)}</text>')
    parts.append(f'<line x1="{_f(left)}" y1="{_f(frame.top)}" x2="{_f(left)}" y2="{_f(frame.bottom)}" stroke="{INK}"/>')
    parts.append(f'<line x1="{_f(left)}" y1="{_f(frame.bottom)}" x2="{_f(frame.right)}" y2="{_f(frame.bottom)}" stroke="{INK}"/>')
    parts.append(f'<text x="{_f((left + frame.right) / 2)}" y="{_f(frame.height - 12)}" text-anchor="middle" '
                 f'class="axis-label">ε (differential privacy, per site, this study)</text>')
    return parts
