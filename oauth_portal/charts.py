"""Server-side SVG charts (the CSP allows no inline script, and the portal needs no chart library).

``spend_clicks_svg`` draws one campaign's spend per day as bars (left axis, account currency) and its
clicks per day as a line (right axis). Every day carries a ``<title>``, so hovering shows the exact
values without any script. Colours and fonts come from classes in ``static/style.css`` (inline
``style`` attributes would be blocked by the CSP); geometry uses SVG attributes.
"""
from __future__ import annotations

import datetime as dt
import math
from resources.money import format_amount
from decimal import Decimal
from typing import Sequence

from markupsafe import Markup, escape

from oauth_portal.reporting import DayPoint

WIDTH, HEIGHT = 960, 300
LEFT, RIGHT, TOP, BOTTOM = 72, 64, 30, 44


def nice_ceiling(value: float) -> float:
    """The smallest "round" number (1, 2, 2.5, 5 × 10^k) at or above ``value`` (1 for 0)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10 ** exponent
        if candidate >= value * (1 - 1e-12):
            return float(candidate)
    return float(10 ** (exponent + 1))


def _fmt_axis(value: float, money: bool) -> str:
    if money:
        if value >= 1_000_000:
            return f"{value / 1_000_000:,.1f}M"
        if value >= 10_000:
            return f"{value / 1000:,.0f}k"
        return f"{value:,.2f}" if value < 10 and value != int(value) else f"{value:,.0f}"
    if value >= 10_000:
        return f"{value / 1000:,.0f}k"
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def _money(value: Decimal, currency: str | None = None) -> str:
    return format_amount(value, currency)


def _label_step(count: int, max_labels: int = 8) -> int:
    return max(1, math.ceil(count / max_labels))


def spend_clicks_svg(points: Sequence[DayPoint], currency: str, title: str) -> Markup:
    """An accessible inline SVG of spend (bars) and clicks (line) per day.

    Args:
        points: consecutive days, oldest first (``reporting.campaign_series``).
        currency: ISO code of the campaign's account, shown on the spend axis.
        title: what the chart is about (escaped).
    """
    count = len(points)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    spend_max = nice_ceiling(float(max((p.spend for p in points), default=0)))
    clicks_max = nice_ceiling(float(max((p.clicks for p in points), default=0)))
    if clicks_max < 4:
        clicks_max = 4.0  # whole-number ticks
    total_spend = sum((p.spend for p in points), Decimal(0))
    total_clicks = sum(p.clicks for p in points)
    first = points[0].day.isoformat() if points else ""
    last = points[-1].day.isoformat() if points else ""
    label = (f"{title}: spend per day in {currency} (bars) and clicks per day (line), {first} to {last}; "
             f"total {_money(total_spend, currency)} {currency}, {total_clicks:,} clicks")
    out = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
           f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">',
           f"<title>{escape(label)}</title>"]

    # grid and axes: 4 intervals, spend on the left, clicks on the right
    for i in range(5):
        y = TOP + plot_h - plot_h * i / 4
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="axis spend-axis" x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{escape(_fmt_axis(spend_max * i / 4, True))}</text>")
        out.append(f'<text class="axis clicks-axis" x="{LEFT + plot_w + 8}" y="{y + 4:.1f}" text-anchor="start">'
                   f"{escape(_fmt_axis(clicks_max * i / 4, False))}</text>")
    out.append(f'<text class="axis-title spend-axis" x="4" y="{TOP - 14}" text-anchor="start">'
               f"Spend ({escape(currency)})</text>")
    out.append(f'<text class="axis-title clicks-axis" x="{WIDTH - 4}" y="{TOP - 14}" '
               f'text-anchor="end">Clicks</text>')

    if count:
        slot = plot_w / count
        bar_w = max(1.0, slot * 0.7)
        step = _label_step(count)
        line = []
        for i, point in enumerate(points):
            x0 = LEFT + i * slot
            spend_h = plot_h * float(point.spend) / spend_max
            cy = TOP + plot_h - plot_h * point.clicks / clicks_max
            line.append(f"{x0 + slot / 2:.1f},{cy:.1f}")
            tip = (f"{point.day.isoformat()}: spend {_money(point.spend, currency)} {currency}, {point.clicks:,} clicks, "
                   f"{point.impressions:,} impressions")
            out.append(f'<g class="day" data-date="{point.day.isoformat()}"><title>{escape(tip)}</title>'
                       f'<rect class="hit" x="{x0:.1f}" y="{TOP}" width="{slot:.1f}" height="{plot_h}"/>'
                       f'<rect class="bar" x="{x0 + (slot - bar_w) / 2:.1f}" y="{TOP + plot_h - spend_h:.1f}" '
                       f'width="{bar_w:.1f}" height="{spend_h:.1f}"/></g>')
            # every step-th day, and the last one (unless it would collide with the previous label)
            if (i % step == 0 and (i == count - 1 or count - 1 - i >= step * 0.7)) or i == count - 1:
                out.append(f'<text class="axis" x="{x0 + slot / 2:.1f}" y="{TOP + plot_h + 18}" '
                           f'text-anchor="middle">{escape(_day_label(point.day, points[0].day))}</text>')
        out.append(f'<polyline class="line" points="{" ".join(line)}"/>')
        if count <= 62:
            for coords in line:
                x, y = coords.split(",")
                out.append(f'<circle class="dot" cx="{x}" cy="{y}" r="2.5"/>')
    else:
        out.append(f'<text class="axis" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">No days in range</text>')

    # legend
    out.append(f'<rect class="bar" x="{LEFT}" y="{HEIGHT - 16}" width="12" height="10"/>'
               f'<text class="legend" x="{LEFT + 18}" y="{HEIGHT - 7}">Spend per day</text>'
               f'<line class="line" x1="{LEFT + 140}" x2="{LEFT + 164}" y1="{HEIGHT - 11}" y2="{HEIGHT - 11}"/>'
               f'<text class="legend" x="{LEFT + 170}" y="{HEIGHT - 7}">Clicks per day</text>')
    out.append("</svg>")
    return Markup("".join(out))


def _day_label(day: dt.date, first: dt.date) -> str:
    if day == first or (day.month == 1 and day.day == 1):
        return day.strftime("%b %d, %Y").replace(" 0", " ")
    return day.strftime("%b %d").replace(" 0", " ")
