"""The loss curve of a run, drawn from its metrics.jsonl (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_metrics(metrics: str | Path | list[dict] | None, png: str | Path) -> Path | None:
    """Loss (total, main head, MTP) against step, the LR on a second axis. Returns the PNG's path,
    or None when matplotlib is missing or there is nothing to draw."""
    recs = metrics if isinstance(metrics, list) else read_metrics(metrics) if metrics else []
    if not recs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no loss-curve plot (pip install matplotlib)")
        return None
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, [r["loss"] for r in recs], label="loss (CE + w * MTP)", lw=1.6)
    ax.plot(steps, [r["lm_loss"] for r in recs], label="main-head CE", lw=1.0, alpha=0.8)
    if "mtp_losses" in recs[0]:
        for k in range(len(recs[0]["mtp_losses"])):
            ax.plot(steps, [r["mtp_losses"][k] for r in recs], label=f"MTP {k} CE (t+{k + 2})", lw=0.8, alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in recs], color="grey", ls="--", lw=0.8, label="lr")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right", fontsize=8)
    ax.set_title("mimo-flash training")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png
