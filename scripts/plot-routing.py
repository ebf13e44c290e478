#!/usr/bin/env python3
"""Draws the routing benchmark's mean and p99 TTFT per router and load as an
SVG bar chart, from the Markdown table bench-routing prints.

    target/release/bench-routing > routing.md && scripts/plot-routing.py routing.md docs/routing-ttft.svg
"""
import sys

rows = []
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 7 and cells[0].endswith("%"):
        rows.append((cells[0], cells[1], float(cells[2]), float(cells[3])))

loads = sorted({r[0] for r in rows}, key=lambda l: float(l.rstrip("%")))
routers = list(dict.fromkeys(r[1] for r in rows))
colors = ["#9aa5b1", "#5c7080", "#d9480f", "#2b8a3e", "#74b816", "#1864ab", "#4dabf7"]
bar, gap, group_gap = 14, 2, 30
scale = 300.0 / max(r[3] for r in rows)
width = 120 + len(loads) * (len(routers) * (bar + gap) + group_gap)
height = 420
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30 * len(routers) // 2 + 40}" font-family="sans-serif" font-size="11">']
out.append(f'<text x="10" y="18" font-size="13">Time to first token by router (bar: mean, tick: p99), ms</text>')
base = 360
out.append(f'<line x1="60" y1="{base}" x2="{width - 10}" y2="{base}" stroke="black"/>')
for tick in range(0, int(max(r[3] for r in rows)) + 1, 200):
    y = base - tick * scale
    out.append(f'<text x="55" y="{y + 4:.0f}" text-anchor="end">{tick}</text>')
    out.append(f'<line x1="58" y1="{y:.0f}" x2="{width - 10}" y2="{y:.0f}" stroke="#eee"/>')
x = 70
for load in loads:
    start = x
    for i, router in enumerate(routers):
        match = [r for r in rows if r[0] == load and r[1] == router]
        if match:
            _, _, mean, p99 = match[0]
            out.append(f'<rect x="{x}" y="{base - mean * scale:.1f}" width="{bar}" height="{mean * scale:.1f}" fill="{colors[i % len(colors)]}"/>')
            out.append(f'<line x1="{x}" y1="{base - p99 * scale:.1f}" x2="{x + bar}" y2="{base - p99 * scale:.1f}" stroke="black" stroke-width="2"/>')
        x += bar + gap
    out.append(f'<text x="{(start + x) / 2:.0f}" y="{base + 16}" text-anchor="middle">{load} load</text>')
    x += group_gap
for i, router in enumerate(routers):
    lx, ly = 70 + (i % 2) * 260, base + 40 + (i // 2) * 18
    out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{colors[i % len(colors)]}"/>')
    out.append(f'<text x="{lx + 18}" y="{ly}">{router}</text>')
out.append("</svg>")
open(sys.argv[2], "w").write("\n".join(out))
