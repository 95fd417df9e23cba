"""`ranktune saliency CONFIG --heuristic NAME [--batches N] --out scores.json`: score every candidate of a config.

The config's `lora` section (every targeted module at its rank) and its `shortcuts` section (every configured
connection) are the candidate pool; the scores feed `ranktune plan`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ranktune.allocation.methods.hetero import HEURISTICS
from ranktune.config import load_config
from ranktune.errors import UserInputError
from ranktune.files import check_output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "saliency", help="score the LoRA modules and shortcut connections of a config with a zero-cost proxy"
    )
    parser.add_argument("config", help="the run config file (its lora section is the candidate pool)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. lora.r=16")
    parser.add_argument("--heuristic", required=True, choices=HEURISTICS)
    parser.add_argument("--batches", type=int, default=32, help="training batches to score over, in order (32)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="alpha_test: relative loss tolerance (0.01)")
    parser.add_argument("--out", required=True, metavar="scores.json")
    parser.set_defaults(func=run)


def score_table(scores: dict[str, float]) -> str:
    rows = [f"{'#':>4}  {'score':>12}  module"]
    for position, (name, score) in enumerate(sorted(scores.items(), key=lambda item: -item[1]), start=1):
        rows.append(f"{position:>4}  {score:>12.5g}  {name}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    if args.batches <= 0:
        raise UserInputError(f"--batches must be > 0, got {args.batches}")
    if not args.out.endswith(".json"):
        raise UserInputError(f"--out expects a .json file name, got '{args.out}'")
    config = load_config(args.config, args.overrides)
    inputs = {Path(args.config): "the config file"}
    inputs.update(
        {
            Path(path): f"the data.{key} file"
            for key in ("train", "validation", "test")
            if (path := getattr(config.data, key))
        }
    )
    check_output_file(args.out, "--out", inputs)
    import torch

    from ranktune.adapters.configured import attach_configured_lora
    from ranktune.allocation.plan import SCORES_FORMAT
    from ranktune.allocation.saliency import candidates, first_batches, score_modules
    from ranktune.data import build_collator
    from ranktune.files import write_text_atomically
    from ranktune.training.run import prepare_run

    run_parts = prepare_run(config)
    model = attach_configured_lora(run_parts.model, config)
    if torch.cuda.is_available():
        model.cuda()
    collator = build_collator(run_parts.tokenizer, config.model.task, packing=config.data.packing)
    batch_size = int(config.training.get("per_device_train_batch_size", 8))
    batches = first_batches(run_parts.datasets["train"], collator, batch_size, args.batches)
    layers = candidates(model)
    print(f"[ranktune] scoring {len(layers)} modules with {args.heuristic} over {len(batches)} batches",
          file=sys.stderr, flush=True)  # fmt: skip
    scores = score_modules(model, batches, args.heuristic, tolerance=args.tolerance)
    payload = {
        "format": SCORES_FORMAT,
        "heuristic": args.heuristic,
        "batches": len(batches),
        "config": args.config,
        "lora_r": config.lora.r,
        "lora_alpha": config.lora.alpha,
        "modules": {
            name: {
                "score": scores[name],
                "rank": int(layers[name].lora_a.shape[0]),
                "in_features": layers[name].in_features,
                "out_features": layers[name].out_features,
            }
            for name in sorted(scores, key=lambda n: -scores[n])
        },
    }
    write_text_atomically(args.out, json.dumps(payload, indent=2) + "\n")
    print(score_table(scores))
    print(f"scores: {args.out}")
    return 0
