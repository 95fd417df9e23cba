"""`ranktune inspect ADAPTER_DIR [--plot FILE.png] [--json]`: where the rank sits in an adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ranktune.errors import UserInputError
from ranktune.files import check_output_file, folder_inputs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="show the rank of every adapted module and shortcut connection")
    parser.add_argument("adapter_dir")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also write a layers × module-type heatmap (and FILE-evolution.png when the run logged rank history); "
        "missing folders are created",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ranktune.adapters.layout import (
        RANK_HISTORY,
        REALLOCATION_HISTORY,
        module_totals,
        read_adapter_config,
        read_module_ranks,
        read_shortcut_ranks,
    )
    from ranktune.reports import (
        enabled_share,
        format_reallocations,
        plot_module_heatmap,
        plot_rank_evolution,
        plot_rank_heatmap,
        rank_table,
        reallocation_changes,
    )

    adapter_dir = Path(args.adapter_dir)
    read_adapter_config(adapter_dir)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UserInputError(f"--plot expects a .png file name, got '{args.plot}'")
    if args.plot:
        check_output_file(
            args.plot, "--plot", folder_inputs(adapter_dir, f"a file of the adapter folder '{adapter_dir}'")
        )
    modules = read_module_ranks(adapter_dir) + read_shortcut_ranks(adapter_dir)
    modules.sort(key=lambda m: (-1 if m.layer is None else m.layer, m.module))  # shortcuts beside their layer
    from ranktune.serving.engines import vllm_max_lora_rank

    largest = max((m.rank for m in modules), default=0)
    serving = vllm_max_lora_rank(largest)
    reallocations = adapter_dir / REALLOCATION_HISTORY
    rows = []
    if reallocations.is_file():
        rows = [json.loads(line) for line in reallocations.read_text(encoding="utf-8").splitlines()]
    if args.json:
        report = {"adapter": str(adapter_dir), "modules": [m.to_dict() for m in modules], **module_totals(modules)}
        report.update(largest_rank=largest, vllm_max_lora_rank=serving)
        if rows:
            report["reallocations"] = reallocation_changes(rows)
        print(json.dumps(report))
    else:
        print(rank_table(modules))
        vllm = f"vLLM serves it with --max-lora-rank {serving}" if serving else "above what vLLM serves"
        cap = "`ranktune export --max-rank N` caps it"
        print(f"largest rank {largest}: engines pad every module to it ({vllm}; {cap})")
        if rows:
            print(format_reallocations(reallocation_changes(rows)))
    if args.plot:
        print(f"plot: {plot_rank_heatmap(modules, args.plot)}")
        history_path = adapter_dir / RANK_HISTORY
        if history_path.is_file():
            history = [json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines()]
            evolution = Path(args.plot).with_name(Path(args.plot).stem + "-evolution.png")
            print(f"plot: {plot_rank_evolution(history, evolution)}")
        if rows:
            enabled = Path(args.plot).with_name(Path(args.plot).stem + "-enabled.png")
            share = enabled_share(rows)
            print(f"plot: {plot_module_heatmap(share, enabled, 'Share of reallocations enabled', 'share enabled')}")
    return 0
