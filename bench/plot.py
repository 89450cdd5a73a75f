#!/usr/bin/env python3
"""Plots of bench/compare's results (target/bench-compare.json) for docs/benchmarks.md.

Usage: plot.py RESULTS OUT_DIR   (run by bench/compare with matplotlib from its venv)

Writes, per round with series or latency quantiles:
  throughput-<round>-<size>.png   acknowledged messages per second over time, per system
  latency-<round>-<size>.png      ack latency distribution (CDF, log-scaled tail), per system;
                                  end-to-end latency in the steady-rate rounds (rate-*)
"""

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"Weir": "#1f77b4", "Kafka": "#d62728", "NATS JetStream": "#2ca02c"}


def main():
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    limit = next((r for r in rows if r["system"] == "disk"), None)
    groups = {}
    for r in rows:
        if r["system"] != "disk":
            groups.setdefault((r["round"], r["size"]), []).append(r)
    for (round_name, size), rs in groups.items():
        with_series = [r for r in rs if r.get("series")]
        if with_series:
            fig, ax = plt.subplots(figsize=(8, 4))
            for r in with_series:
                step = r.get("series_interval_s", 1)
                xs = [step * (i + 1) for i in range(len(r["series"]))]
                ax.plot(xs, [v * size / 1e6 for v in r["series"]], label=r["system"],
                        color=COLORS.get(r["system"]), marker=".")
            if limit:
                ax.axhline(limit["direct_write_mbps"], color="grey", linestyle="--",
                           label="disk, direct sequential writes")
            ax.set_xlabel("seconds")
            ax.set_ylabel(f"payload MB/s ({size}-byte messages)")
            ax.set_title(f"{round_name}: acknowledged produce over time")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / f"throughput-{round_name}-{size}.png", dpi=100)
            plt.close(fig)
        with_quantiles = [r for r in rs if r.get("latency_quantiles")]
        if with_quantiles:
            fig, ax = plt.subplots(figsize=(8, 4))
            for r in with_quantiles:
                qs = sorted((float(q), ms) for q, ms in r["latency_quantiles"].items())
                # y: the quantile's "nines", -log10(1 - q), so the tail is visible.
                ax.plot([ms for _, ms in qs], [-math.log10(1 - min(q, 0.99999)) for q, _ in qs],
                        marker=".", label=r["system"], color=COLORS.get(r["system"]))
            ticks = [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999]
            ax.set_yticks([-math.log10(1 - q) for q in ticks])
            ax.set_yticklabels(["p0", "p50", "p90", "p99", "p99.9", "p99.99", "p99.999"])
            kind = with_quantiles[0].get("latency_kind", "ack")
            ax.set_xscale("log")
            ax.set_xlabel(f"{kind} latency, ms")
            ax.set_ylabel("quantile")
            ax.set_title(f"{round_name}, {size}-byte messages: {kind} latency CDF")
            ax.legend()
            ax.grid(alpha=0.3, which="both")
            fig.tight_layout()
            fig.savefig(out / f"latency-{round_name}-{size}.png", dpi=100)
            plt.close(fig)


if __name__ == "__main__":
    main()
