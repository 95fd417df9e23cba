"""Human-readable views of an adapter's ranks: a per-module table, a layers × module-type heatmap, and how the
ranks of an adaptive-rank run moved over training (from rank_history.jsonl)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ranktune.adapters.layout import ModuleRank, layer_of, module_totals, module_types


def rank_table(modules: list[ModuleRank]) -> str:
    """One line per adapted module, then totals."""
    width = max([14, *(len(m.module_type) for m in modules)])
    rows = [f"{'layer':>5}  {'type':<{width}} {'rank':>5} {'params':>10}  module"]
    for m in modules:
        layer = "-" if m.layer is None else str(m.layer)
        rows.append(f"{layer:>5}  {m.module_type:<{width}} {m.rank:>5} {m.parameters:>10,}  {m.module}")
    totals = module_totals(modules)
    rows.append(
        f"total: {totals['module_count']} modules, rank {totals['total_rank']}, "
        f"{totals['adapter_parameters']:,} adapter parameters"
    )
    return "\n".join(rows)


def module_grid(values: dict[str, float]) -> tuple[list[int], list[str], np.ndarray]:
    """Per-module values laid out as layers (rows) × module types (columns); NaN where a layer has no such module.

    Modules outside the layers (a pooler) have no row and are left out.
    """
    types = module_types(values)
    in_layers = {name: layer_of(name) for name in values if layer_of(name) is not None}
    layers = sorted(set(in_layers.values()))
    columns = sorted({types[name] for name in in_layers})
    grid = np.full((len(layers), len(columns)), np.nan)  # (L, T)
    for name, layer in in_layers.items():
        grid[layers.index(layer), columns.index(types[name])] = values[name]
    return layers, columns, grid


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path) -> Path:
    """Writes a figure as a PNG (parent folders created) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    return path


def rank_evolution(history: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """Mean rank per module type at every recorded step (types labelled as in `module_types`)."""
    steps = [record["step"] for record in history]
    series: dict[str, list[float]] = {}
    types = module_types({name for record in history for name in record["modules"]})
    for record in history:
        by_type: dict[str, list[int]] = {}
        for name, stats in record["modules"].items():
            by_type.setdefault(types[name], []).append(stats["rank"])
        for module_type, ranks in by_type.items():
            series.setdefault(module_type, []).append(sum(ranks) / len(ranks))
    return steps, series


def plot_rank_evolution(history: list[dict], path: str | Path) -> Path:
    """Writes a PNG of the mean rank per module type over optimizer steps."""
    steps, series = rank_evolution(history)
    figure, axes = pyplot().subplots(figsize=(7, 4))
    for module_type, values in sorted(series.items()):
        axes.step(steps, values, where="post", label=module_type)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean rank")
    axes.set_title("Rank per module type during training")
    axes.legend(fontsize="small", ncol=2)
    return save_figure(figure, path)


def plot_module_heatmap(values: dict[str, float], path: str | Path, title: str, label: str) -> Path:
    """Writes a PNG heatmap of `module_grid(values)`."""
    layers, types, grid = module_grid(values)
    figure, axes = pyplot().subplots(figsize=(1.2 + 0.9 * max(len(types), 1), 1.2 + 0.35 * max(len(layers), 1)))
    image = axes.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(types)), types, rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=label)
    return save_figure(figure, path)


def plot_rank_heatmap(modules: list[ModuleRank], path: str | Path) -> Path:
    """The final rank of every adapted module as a layers × module-type heatmap."""
    return plot_module_heatmap({m.module: m.rank for m in modules}, path, "LoRA rank per module", "rank")


def reallocation_changes(rows: list[dict]) -> list[dict[str, int | None]]:
    """Per HeteroLoRA reallocation (from reallocation_history.jsonl): its step, how many candidates it enabled, and
    how many it switched on and off against the one before (None for the first)."""
    selections: dict[int, set[str]] = {}
    for row in rows:
        chosen = selections.setdefault(int(row["step"]), set())
        if row["enabled"]:
            chosen.add(row["module"])
    changes: list[dict[str, int | None]] = []
    before: set[str] | None = None
    for step in sorted(selections):
        chosen = selections[step]
        switched_on = None if before is None else len(chosen - before)
        switched_off = None if before is None else len(before - chosen)
        changes.append({"step": step, "enabled": len(chosen), "switched_on": switched_on, "switched_off": switched_off})
        before = chosen
    return changes


def format_reallocations(changes: list[dict[str, int | None]]) -> str:
    """One line: how many reallocations, and the candidates each after the first switched on and off."""
    moves = [f"+{c['switched_on']}/-{c['switched_off']}" for c in changes[1:]]
    line = f"reallocations: {len(changes)} (steps {', '.join(str(c['step']) for c in changes)})"
    if not moves:
        return line
    if not any(c["switched_on"] or c["switched_off"] for c in changes[1:]):
        return f"{line}; the selection never changed after the first"
    return f"{line}; candidates switched on/off by each after the first: {', '.join(moves)}"


def enabled_share(rows: list[dict]) -> dict[str, float]:
    """Per module, the share of HeteroLoRA's reallocations that enabled it (from reallocation_history.jsonl)."""
    counts: dict[str, list[int]] = {}
    for row in rows:
        counts.setdefault(row["module"], []).append(int(row["enabled"]))
    return {name: sum(flags) / len(flags) for name, flags in counts.items()}
