"""Human-readable views of an adapter's ranks: a per-module table and a layers × module-type heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ranktune.adapters.layout import ModuleRank


def rank_table(modules: list[ModuleRank]) -> str:
    """One line per adapted module, then totals."""
    rows = [f"{'layer':>5}  {'type':<14} {'rank':>5} {'params':>10}  module"]
    for m in modules:
        layer = "-" if m.layer is None else str(m.layer)
        rows.append(f"{layer:>5}  {m.module_type:<14} {m.rank:>5} {m.parameters:>10,}  {m.module}")
    total_rank = sum(m.rank for m in modules)
    total_params = sum(m.parameters for m in modules)
    rows.append(f"total: {len(modules)} modules, rank {total_rank}, {total_params:,} LoRA parameters")
    return "\n".join(rows)


def rank_grid(modules: list[ModuleRank]) -> tuple[list[int], list[str], np.ndarray]:
    """Ranks laid out as layers (rows) × module types (columns); NaN where a layer has no such module."""
    layers = sorted({m.layer for m in modules if m.layer is not None})
    types = sorted({m.module_type for m in modules if m.layer is not None})
    grid = np.full((len(layers), len(types)), np.nan)  # (L, T)
    for m in modules:
        if m.layer is not None:
            grid[layers.index(m.layer), types.index(m.module_type)] = m.rank
    return layers, types, grid


def plot_rank_heatmap(modules: list[ModuleRank], path: str | Path, title: str = "LoRA rank per module") -> Path:
    """Writes a PNG heatmap of `rank_grid`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, types, grid = rank_grid(modules)
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * max(len(types), 1), 1.2 + 0.35 * max(len(layers), 1)))
    image = axes.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(types)), types, rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="rank")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
