#!/usr/bin/env python3
"""Plots time and memory per craft step against K, the batch size and the ensemble size M
from `bench --out` JSON lines (benches/cpu-scaling.sh, the GPU scripts): one SVG per input
file, a column per swept variable, time on the top row and memory below, every measured
point drawn and a dashed least-squares line whose slope the panel's title gives.

    python3 benches/plot_scaling.py OUT.svg TITLE RESULTS.jsonl [NET]

NET (e.g. resnet18) picks the network when the file holds several; default: the most common.

No dependencies beyond the standard library."""

import json
import sys
from collections import defaultdict

# The sweeps: which spec field varies, with the others held at these values.
SWEEPS = [
    ("unroll_steps", "K (unrolled steps)", {"ensemble": 1, "batch": 125}),
    ("batch", "batch size", {"ensemble": 1, "unroll_steps": 2}),
    ("ensemble", "M (surrogates)", {"unroll_steps": 2, "batch": 125}),
]
PANEL_W, PANEL_H, MARGIN_L, MARGIN_T, GAP = 300, 190, 62, 58, 40


def memory_gb(record):
    gpu = record.get("ours_gpu_memory_bytes")
    return (gpu if gpu else record["ours_peak_rss_bytes"]) / 1e9, bool(gpu)


def sweep_points(records, field, held):
    """(x, seconds, GB) of the records where `field` varies and the rest is as held; a
    variable only counts as swept when it takes at least three values."""
    points = []
    for r in records:
        s = r["spec"]
        if all(s.get(k) == v for k, v in held.items()):
            gb, _ = memory_gb(r)
            points.append((s[field], r["ours"]["median_s"], gb))
    return points if len({p[0] for p in points}) >= 3 else []


def fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def rate(v):
    return f"{v:+,.0f}" if abs(v) >= 100 else f"{v:+.3g}"


def nice_max(v):
    for step in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10, 20, 25, 50, 100):
        if v <= step * 5:
            return step * 5, step
    return v, v / 5


def panel(out, x0, y0, points, xlabel, ylabel, unit, slope_unit):
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    xmin, xmax = min(xs), max(xs)
    ymax, ystep = nice_max(max(ys) * 1.1)
    sx = lambda x: x0 + (x - xmin) / (xmax - xmin) * PANEL_W
    sy = lambda y: y0 + PANEL_H - y / ymax * PANEL_H
    slope, icept = fit(xs, ys)
    out.append(
        f'<text x="{x0 + PANEL_W / 2}" y="{y0 - 10}" text-anchor="middle" font-size="12">'
        f"{ylabel} vs {xlabel}: {rate(slope * slope_unit[0])} {slope_unit[1]}</text>"
    )
    out.append(f'<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/>')
    tick = 0.0
    while tick <= ymax + 1e-9:
        y = sy(tick)
        out.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x0 + PANEL_W}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{tick:g}</text>')
        tick += ystep
    for x in sorted(set(xs)):
        out.append(f'<text x="{sx(x):.1f}" y="{y0 + PANEL_H + 14}" text-anchor="middle" font-size="10">{x:g}</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 + PANEL_H + 30}" text-anchor="middle" font-size="11">{xlabel}</text>')
    out.append(
        f'<text x="{x0 - 44}" y="{y0 + PANEL_H / 2}" text-anchor="middle" font-size="11" '
        f'transform="rotate(-90 {x0 - 44} {y0 + PANEL_H / 2})">{unit}</text>'
    )
    out.append(
        f'<line x1="{sx(xmin):.1f}" y1="{sy(icept + slope * xmin):.1f}" x2="{sx(xmax):.1f}" '
        f'y2="{sy(icept + slope * xmax):.1f}" stroke="#1f77b4" stroke-dasharray="5,4"/>'
    )
    for x, y in zip(xs, ys):
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="#d62728"/>')


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    path, title, results = sys.argv[1:4]
    records = [json.loads(l) for l in open(results) if l.strip()]
    records = [r for r in records if r.get("kind") == "bench" and r.get("ours")]
    if not records:
        sys.exit(f"{results}: no bench records")
    nets = [r["spec"]["net"] for r in records]
    net = sys.argv[4] if len(sys.argv) == 5 else max(set(nets), key=nets.count)
    records = [r for r in records if r["spec"]["net"] == net]
    if not records:
        sys.exit(f"{results}: no bench records of {net}")
    sweeps = [(f, label, sweep_points(records, f, held)) for f, label, held in SWEEPS]
    sweeps = [s for s in sweeps if s[2]]
    if not sweeps:
        sys.exit(f"{results}: no variable takes three values with the others held")
    on_gpu = memory_gb(records[0])[1]
    memory_label = "GPU memory (NVML), GB" if on_gpu else "peak resident memory, GB"
    width = MARGIN_L + len(sweeps) * (PANEL_W + MARGIN_L) + 10
    height = MARGIN_T + 2 * PANEL_H + 50 + GAP + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
    ]
    per = {"unroll_steps": "step", "batch": "image", "ensemble": "surrogate"}
    for col, (field, label, points) in enumerate(sweeps):
        x0 = MARGIN_L + col * (PANEL_W + MARGIN_L)
        times = [(x, t) for x, t, _ in points]
        mems = [(x, g) for x, _, g in points]
        panel(out, x0, MARGIN_T, times, label, "time", "seconds a step", (1000, f"ms per {per[field]}"))
        panel(out, x0, MARGIN_T + PANEL_H + 50 + GAP, mems, label, "memory", memory_label, (1000, f"MB per {per[field]}"))
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    for field, _, points in sweeps:
        by_x = defaultdict(list)
        for x, t, g in points:
            by_x[x].append((t, g))
        print(field, {x: v for x, v in sorted(by_x.items())})


if __name__ == "__main__":
    main()
