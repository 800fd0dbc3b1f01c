"""Draw bench/results.png with matplotlib from the bench venv (the project venv gets nothing new)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.stack import LABELS
from bench.tools import ensure_bench_venv

CHART = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
res = json.load(open(sys.argv[1]))
s = res["summary"]
labels = json.loads(sys.argv[3])
series = {"rps": s.get("rps"), "p50_ms": s.get("p50_ms"),
          "inflight": {t: v["rps"] for t, v in s.get("inflight", {}).items()} or None}
panels = [p for p in ("rps", "p50_ms", "inflight") if series[p]]
fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.2))
axes = axes if len(panels) > 1 else [axes]
titles = {"rps": "non-stream chat, 16 connections\n(req/s, higher is better)",
          "p50_ms": "latency p50 at 1 connection\n(ms, lower is better)",
          "inflight": "750 in flight, upstream answers after 1.5 s\n(req/s, higher is better)"}
colors = {"upstream": "#999999", "xiaoyi": "#2a9d8f", "litellm": "#e76f51",
          "portkey": "#e9c46a", "baseline": "#8ab17d"}
for ax, panel in zip(axes, panels):
    names = list(series[panel])
    vals = [series[panel][n] for n in names]
    bars = ax.bar([labels.get(n, n) for n in names], vals,
                  color=[colors.get(n, "#457b9d") for n in names])
    ax.set_title(titles[panel], fontsize=10)
    ax.bar_label(bars, fmt="%.2f" if panel == "p50_ms" else "%.0f", fontsize=9)
    if panel != "inflight":
        ax.set_yscale("log")
    ax.tick_params(axis="x", labelsize=8)
fig.suptitle(res["meta"]["title"], fontsize=11)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""


def write_chart(results_json: Path, png: Path) -> str:
    """Draw the chart; return a note."""
    try:
        python = ensure_bench_venv([("matplotlib", "matplotlib")])
    except subprocess.CalledProcessError as exc:
        return f"chart skipped: {exc}"
    labels = json.dumps({k: v.replace(", ", "\n").replace(" ", "\n", 1) for k, v in
                         LABELS.items()})
    done = subprocess.run([str(python), "-c", CHART, str(results_json), str(png), labels],
                          capture_output=True, text=True)
    return "chart written" if done.returncode == 0 else f"chart failed: {done.stderr[-500:]}"
