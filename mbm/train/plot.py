"""A PNG of the loss and metric curves in metrics.jsonl, drawn with Pillow (matplotlib is not a dependency)."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
W, H, PAD = 640, 300, 48
SKIP = {"step", "split", "samples", "tokens", "epoch"}  # counts, not curves


def _series(records: list[dict[str, Any]]) -> tuple[dict[str, list], dict[str, list]]:
    """Loss curves (train, val) and the other val metrics, each a list of (step, value)."""
    losses: dict[str, list] = {}
    metrics: dict[str, list] = {}
    for r in records:
        for k, v in r.items():
            if k in SKIP or not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            if k == "loss":
                losses.setdefault(f"{r['split']} loss", []).append((r["step"], float(v)))
            elif r.get("split") == "val":
                metrics.setdefault(k, []).append((r["step"], float(v)))
    return losses, metrics


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: dict[str, list]) -> None:
    x0, y0, x1, y1 = PAD, top + 24, W - 12, top + H - 28
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((x0, top + 6), title, fill=(0, 0, 0))
    points = [p for s in series.values() for p in s]
    if not points:
        return
    sx = (min(p[0] for p in points), max(p[0] for p in points))
    sy = (min(p[1] for p in points), max(p[1] for p in points))
    span_x, span_y = (sx[1] - sx[0]) or 1, (sy[1] - sy[0]) or 1

    def xy(p: tuple[float, float]) -> tuple[float, float]:
        return x0 + (p[0] - sx[0]) / span_x * (x1 - x0), y1 - (p[1] - sy[0]) / span_y * (y1 - y0)

    for frac in (0.0, 0.5, 1.0):
        y = sy[0] + frac * span_y
        draw.text((2, xy((sx[0], y))[1] - 6), f"{y:.3g}", fill=(80, 80, 80))
    draw.text((x0, y1 + 6), f"step {sx[0]:g}", fill=(80, 80, 80))
    draw.text((x1 - 70, y1 + 6), f"step {sx[1]:g}", fill=(80, 80, 80))
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        line = [xy(p) for p in sorted(pts)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line[-1:] if len(line) > 1 else line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((x1 - 150, y0 + 6 + 12 * i), name, fill=color)


def plot_metrics(records: list[dict[str, Any]], path: str) -> None:
    """Write a two-panel PNG: losses (train and val), then held-out metrics."""
    losses, metrics = _series(records)
    img = Image.new("RGB", (W, 2 * H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _panel(draw, 0, "loss", losses)
    _panel(draw, H, "held-out metrics", metrics)
    img.save(path, format="PNG")
