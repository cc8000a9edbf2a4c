"""Bar charts of the ratios in RESULTS.md, from the JSON the benchmarks wrote: each variant against PEFT and
against the floor (the base model with no LoRA). Needs matplotlib (``pip install lora_fx[bench]``).

    python benchmarks/plot.py            # writes benchmarks/ratios.png
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    path = HERE / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _bars(ax, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> None:
    """``groups``: series label -> {variant: ratio}; one bar per (variant, series), a line at 1."""
    variants = list(dict.fromkeys(v for series in groups.values() for v in series))
    width = 0.8 / max(len(groups), 1)
    for i, (label, series) in enumerate(groups.items()):
        xs = [j + i * width for j, v in enumerate(variants) if v in series]
        bars = ax.bar(xs, [series[v] for v in variants if v in series], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(variants))])
    ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    train = _rows("train_step")
    _bars(axes[0], "train step, batch 4x128 (lower is better)",
          {"x PEFT": {r["variant"]: r["x PEFT"] for r in train},
           "x floor": {r["variant"]: r["x floor"] for r in train}}, "ratio")
    forward = _rows("forward")
    by_size: dict[str, dict[str, float]] = {}
    for r in forward:
        by_size.setdefault(f"{r['batch x tokens']}: x PEFT", {})[r["variant"]] = r["x PEFT"]
    _bars(axes[1], "forward, no grad (lower is better)", by_size, "ratio")
    many = _rows("many_adapters")
    by_measure: dict[str, dict[str, float]] = {}
    for r in many:
        by_measure.setdefault(f"{r['measure']}: x PEFT mixed", {})[r["variant"]] = r["vs PEFT mixed"]
    _bars(axes[2], "4 adapters, one per row (lower is better)", by_measure, "ratio")
    fig.tight_layout()
    out = HERE / "ratios.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
