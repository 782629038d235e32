"""Server-rendered charts for the built-in dashboards page: inline SVG, no script, no CDN.

The browser that shows the page may reach nothing but the sink's own port, so every chart is
drawn here: time series as lines or stacked areas (or bars per bucket) over the selected range,
distributions as bars, single figures as a large number. Every point and bar carries a
``<title>``, which browsers show on hover. All text is escaped.

Hand-written rather than a chart library: a few static SVG paths need none, and the browser then
loads nothing. The page around the charts is Jinja2 templates (``analytics/templates/``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import escape

from dashboards.definitions import Unit

#: Colour-blind-safe categorical palette (Okabe-Ito, then Tableau's muted tones).
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#7F7F7F",
    "#8C564B",
    "#17BECF",
    "#BCBD22",
    "#1F3A93",
)
_FONT = "font-family='system-ui, -apple-system, Segoe UI, sans-serif'"
_AXIS = "#6b7280"
_GRID = "#e5e7eb"
_MARGIN_LEFT = 56
_MARGIN_RIGHT = 14
_MARGIN_TOP = 10
_MARGIN_BOTTOM = 24
#: Beyond this many points a series is drawn without markers (stacked areas: fewer).
_MARKERS_UP_TO = 60
_STACKED_MARKERS_UP_TO = 24
#: Round time steps (seconds): the ticks of a time axis, and the bucket widths of the page.
TIME_STEPS = (
    1,
    2,
    5,
    10,
    15,
    30,
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
    172800,
    259200,
    604800,
)


@dataclass
class Series:
    name: str
    points: dict[datetime, float] = field(default_factory=dict)


def format_value(value: float | None, unit: Unit, decimals: int = 0) -> str:
    """``value`` as the unit shows it: 1.2k, 340 ms, 1.4 s, 12.5%, 3.2/min."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit is Unit.RATIO:
        return f"{value * 100:.{decimals}f}%"
    if unit is Unit.MILLISECONDS:
        if abs(value) >= 1000:
            return f"{value / 1000:.{max(decimals, 1)}f} s"
        return f"{value:.{decimals}f} ms"
    text = _compact(value, decimals)
    return f"{text}/min" if unit is Unit.PER_MINUTE else text


def _compact(value: float, decimals: int) -> str:
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.1f}".rstrip("0").rstrip(".") + suffix
    if decimals == 0 and value != int(value):
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.{decimals}f}"


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above ``value``."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate: float = step * 10.0**exponent
        if candidate >= value * (1 - 1e-9):
            return candidate
    return 10.0 ** (exponent + 1)


def _value_ticks(top: float, unit: Unit) -> tuple[float, list[float]]:
    """A rounded axis top and its ticks (4 intervals)."""
    if unit is Unit.RATIO and top <= 1:
        return 1.0, [0.0, 0.25, 0.5, 0.75, 1.0]
    ceiling = _nice_ceiling(top / 4) * 4 if top > 0 else 4.0
    if top > 0 and ceiling < 4:  # small counts: whole-number ticks when they fit
        ceiling = 4.0
    return ceiling, [ceiling * index / 4 for index in range(5)]


def _time_label(moment: datetime, step_seconds: int, span_seconds: float) -> str:
    if span_seconds > 2 * 86400:
        return moment.strftime("%m-%d") if step_seconds >= 86400 else moment.strftime("%m-%d %H:%M")
    if step_seconds < 60:
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%H:%M")


def _time_ticks(start: datetime, end: datetime, width: float) -> tuple[int, list[datetime]]:
    """A round step (seconds) giving a tick every ~95 px, and the ticks."""
    span = (end - start).total_seconds()
    wanted = max(3, int(width // 95))
    step = next((s for s in TIME_STEPS if span / s <= wanted), TIME_STEPS[-1])
    epoch = start.timestamp()
    first = math.ceil(epoch / step) * step
    ticks = []
    moment = first
    while moment <= end.timestamp():
        ticks.append(datetime.fromtimestamp(moment, UTC))
        moment += step
    return step, ticks


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f"<svg class='chart' viewBox='0 0 {width} {height}' width='100%' "
        f"preserveAspectRatio='xMidYMid meet' role='img' aria-label='{escape(label)}' "
        f"xmlns='http://www.w3.org/2000/svg' {_FONT} font-size='11'>"
    )


def _y_axis(
    ticks: list[float],
    top: float,
    plot: tuple[float, float, float, float],
    unit: Unit,
    decimals: int,
) -> list[str]:
    left, top_px, right, bottom = plot
    parts = []
    for tick in ticks:
        y = bottom - (tick / top) * (bottom - top_px) if top else bottom
        parts.append(
            f"<line x1='{left:.1f}' x2='{right:.1f}' y1='{y:.1f}' y2='{y:.1f}' "
            f"stroke='{_GRID}' stroke-width='1'/>"
        )
        label = format_value(tick, unit, decimals if unit is not Unit.RATIO else 0)
        parts.append(
            f"<text x='{left - 6:.1f}' y='{y + 3.5:.1f}' text-anchor='end' fill='{_AXIS}'>"
            f"{escape(label)}</text>"
        )
    return parts


def _stacked_baselines(
    series: Sequence[Series], times: Sequence[datetime], *, stack: bool
) -> tuple[list[dict[datetime, float]], dict[datetime, float]]:
    """Each series' baseline and the running total. Stacked: each series sits on the sum of
    the ones before it, at every time any has; otherwise every baseline is zero."""
    baselines: list[dict[datetime, float]] = []
    running = dict.fromkeys(times, 0.0)
    for item in series:
        baselines.append(dict(running))
        if stack:
            for moment in times:
                running[moment] += item.points.get(moment, 0.0)
    return baselines, running


def _x_axis(
    start: datetime,
    end: datetime,
    span: float,
    plot: tuple[float, float, float, float],
    x_of: Callable[[datetime], float],
) -> list[str]:
    """The time axis: a tick and a label at each round time (no label past the right edge)."""
    left, _, right, bottom = plot
    parts = []
    tick_step, time_ticks = _time_ticks(start, end, right - left)
    for tick in time_ticks:
        x = x_of(tick)
        parts.append(
            f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{bottom:.1f}' y2='{bottom + 4:.1f}' "
            f"stroke='{_AXIS}'/>"
        )
        if x > right - 24:  # its label would run past the edge
            continue
        label = _time_label(tick, tick_step, span)
        parts.append(
            f"<text x='{x:.1f}' y='{bottom + 16:.1f}' text-anchor='middle' fill='{_AXIS}'>"
            f"{escape(label)}</text>"
        )
    parts.append(
        f"<line x1='{left:.1f}' x2='{right:.1f}' y1='{bottom:.1f}' y2='{bottom:.1f}' "
        f"stroke='{_AXIS}'/>"
    )
    return parts


def timeseries_svg(
    series: Sequence[Series],
    *,
    start: datetime,
    end: datetime,
    interval_seconds: int,
    unit: Unit,
    width: int,
    height: int,
    stack: bool = False,
    bars: bool = False,
    decimals: int = 0,
    title: str = "",
    chart_id: str = "chart",
) -> str:
    """Lines (or stacked areas, or bars per bucket) of ``series`` over ``[start, end)``;
    ``chart_id`` is unique on the page."""
    plot = (
        float(_MARGIN_LEFT),
        float(_MARGIN_TOP),
        float(width - _MARGIN_RIGHT),
        float(height - _MARGIN_BOTTOM),
    )
    left, top_px, right, bottom = plot
    times = sorted({moment for item in series for moment in item.points})
    if times:  # whole buckets: the first may start before the range, the last end after it
        start = min(start, times[0])
        end = max(end, times[-1] + timedelta(seconds=interval_seconds))
    span = max((end - start).total_seconds(), 1.0)

    def x_of(moment: datetime) -> float:
        return left + ((moment - start).total_seconds() / span) * (right - left)

    baselines, running = _stacked_baselines(series, times, stack=stack)
    highest = (
        max(running.values(), default=0.0)
        if stack
        else max((v for item in series for v in item.points.values()), default=0.0)
    )
    top, ticks = _value_ticks(highest, unit)

    def y_of(value: float) -> float:
        return bottom - (value / top) * (bottom - top_px)

    parts = [_svg_open(width, height, title), *_y_axis(ticks, top, plot, unit, decimals)]
    parts.extend(_x_axis(start, end, span, plot, x_of))
    bucket_px = max(1.0, (interval_seconds / span) * (right - left))
    few = len(times) <= (_STACKED_MARKERS_UP_TO if stack else _MARKERS_UP_TO)
    # Buckets that start before the range or end after it are cut at the plot's edges.
    clip = f"clip-{escape(chart_id)}"
    parts.append(
        f"<clipPath id='{clip}'><rect x='{left:.1f}' y='{top_px - 4:.1f}' "
        f"width='{right - left:.1f}' height='{bottom - top_px + 8:.1f}'/></clipPath>"
        f"<g clip-path='url(#{clip})'>"
    )
    for index, item in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        base = baselines[index] if stack else dict.fromkeys(times, 0.0)
        ordered = sorted(item.points.items())
        name = escape(item.name)
        if bars:
            slots = len(series) if not stack else 1
            bar_width = max(1.0, bucket_px * 0.8 / slots)
            for moment, value in ordered:
                x = x_of(moment) + bucket_px * 0.1 + (0 if stack else index * bar_width)
                y_top, y_bottom = y_of(base[moment] + value), y_of(base[moment])
                parts.append(
                    f"<rect class='mark' x='{x:.1f}' y='{y_top:.1f}' width='{bar_width:.1f}' "
                    f"height='{max(0.0, y_bottom - y_top):.1f}' fill='{colour}'>"
                    f"<title>{name} · {moment:%Y-%m-%d %H:%M:%S}Z: "
                    f"{escape(format_value(value, unit, decimals))}</title></rect>"
                )
            continue
        if stack:
            keys = times
            upper = [(x_of(t), y_of(base[t] + item.points.get(t, 0.0))) for t in keys]
            lower = [(x_of(t), y_of(base[t])) for t in reversed(keys)]
            outline = " ".join(f"{x:.1f},{y:.1f}" for x, y in upper + lower)
            parts.append(
                f"<polygon points='{outline}' fill='{colour}' fill-opacity='0.35' stroke='none'/>"
            )
            line = upper
        else:
            line = [(x_of(t), y_of(v)) for t, v in ordered]
        if len(series) == 1 and not stack and len(line) > 1:
            area = [*line, (line[-1][0], bottom), (line[0][0], bottom)]
            outline = " ".join(f"{x:.1f},{y:.1f}" for x, y in area)
            parts.append(
                f"<polygon points='{outline}' fill='{colour}' fill-opacity='0.12' stroke='none'/>"
            )
        if len(line) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in line)
            parts.append(
                f"<polyline class='mark' points='{path}' fill='none' stroke='{colour}' "
                "stroke-width='2' stroke-linejoin='round'/>"
            )
        if few or len(line) == 1:
            for moment, value in ordered:
                cy = y_of(base[moment] + value) if stack else y_of(value)
                parts.append(
                    f"<circle class='mark' cx='{x_of(moment):.1f}' cy='{cy:.1f}' r='2.6' "
                    f"fill='{colour}'><title>{name} · {moment:%Y-%m-%d %H:%M:%S}Z: "
                    f"{escape(format_value(value, unit, decimals))}</title></circle>"
                )
    parts.append("</g></svg>")
    return "".join(parts)


def bar_svg(
    categories: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    unit: Unit,
    width: int,
    height: int,
    decimals: int = 0,
    title: str = "",
) -> str:
    """Vertical bars: one group per category, one bar per series, the value above each."""
    plot = (
        float(_MARGIN_LEFT),
        float(_MARGIN_TOP + 8),
        float(width - _MARGIN_RIGHT),
        float(height - _MARGIN_BOTTOM),
    )
    left, top_px, right, bottom = plot
    highest = max((value for _, values in series for value in values), default=0.0)
    top, ticks = _value_ticks(highest, unit)
    parts = [_svg_open(width, height, title), *_y_axis(ticks, top, plot, unit, decimals)]
    slot = (right - left) / max(len(categories), 1)
    bar_width = min(64.0, slot * 0.7 / max(len(series), 1))
    for position, category in enumerate(categories):
        centre = left + slot * (position + 0.5)
        group_left = centre - bar_width * len(series) / 2
        for index, (name, values) in enumerate(series):
            value = values[position]
            y = bottom - (value / top) * (bottom - top_px) if top else bottom
            x = group_left + index * bar_width
            label = escape(format_value(value, unit, decimals))
            parts.append(
                f"<rect class='mark' x='{x + 1:.1f}' y='{y:.1f}' width='{bar_width - 2:.1f}' "
                f"height='{bottom - y:.1f}' rx='2' fill='{PALETTE[index % len(PALETTE)]}'>"
                f"<title>{escape(category)} · {escape(name)}: {label}</title></rect>"
            )
            parts.append(
                f"<text x='{x + bar_width / 2:.1f}' y='{y - 4:.1f}' text-anchor='middle' "
                f"fill='#111827'>{label}</text>"
            )
        parts.append(
            f"<text x='{centre:.1f}' y='{bottom + 16:.1f}' text-anchor='middle' fill='{_AXIS}'>"
            f"{escape(category)}</text>"
        )
    parts.append(
        f"<line x1='{left:.1f}' x2='{right:.1f}' y1='{bottom:.1f}' y2='{bottom:.1f}' "
        f"stroke='{_AXIS}'/>"
    )
    parts.append("</svg>")
    return "".join(parts)
