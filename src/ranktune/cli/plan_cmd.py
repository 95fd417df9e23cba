"""`ranktune plan scores.json --keep 0.25 [--redistribute] --out plan.yaml [--peft-out lora.json]`: a static plan.

Apply it with `lora.plan: plan.yaml` in a training config. `--peft-out` also writes the chosen LoRA modules and ranks
as `peft.LoraConfig` fields (`target_modules`, `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`), for PEFT or any
trainer that takes a rank_pattern; shortcut connections, which PEFT cannot express, are left out of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ranktune.errors import UserInputError
from ranktune.files import check_output_file

if TYPE_CHECKING:
    from ranktune.allocation.plan_file import Plan


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="keep the top-scoring LoRA modules: a plan for lora.plan")
    parser.add_argument("scores", help="a `ranktune saliency` output")
    parser.add_argument("--keep", type=float, default=0.25, help="fraction of modules to keep (0.25)")
    parser.add_argument(
        "--redistribute", action="store_true", help="spread the kept modules' parameter budget by score"
    )
    parser.add_argument("--seed", type=int, default=0, help="orders equal scores (0)")
    parser.add_argument(
        "--shortcuts-mode",
        choices=("combined", "separated", "off"),
        default="combined",
        help="how shortcut connections compete: one pool with the LoRA modules, their own top --keep, or all kept",
    )
    parser.add_argument("--out", required=True, metavar="plan.yaml")
    parser.add_argument(
        "--peft-out", metavar="lora.json", help="also write the LoRA modules and ranks as peft.LoraConfig fields"
    )
    parser.add_argument(
        "--alpha", type=float, help="lora_alpha of the pool for --peft-out (default: the scored config's)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ranktune.allocation.plan import make_plan, read_scores
    from ranktune.allocation.plan_file import PLAN_FORMAT, Plan
    from ranktune.files import write_text_atomically

    if not args.out.endswith((".yaml", ".yml")):
        raise UserInputError(f"--out expects a .yaml file name, got '{args.out}'")
    check_output_file(args.out, "--out", {Path(args.scores): "the --scores file"})
    if args.peft_out is not None:
        if not args.peft_out.endswith(".json"):
            raise UserInputError(f"--peft-out expects a .json file name, got '{args.peft_out}'")
        taken = {Path(args.scores): "the --scores file", Path(args.out): "--out"}
        check_output_file(args.peft_out, "--peft-out", taken)
    data = read_scores(args.scores)
    modules = data["modules"]
    try:
        scores = {name: float(entry["score"]) for name, entry in modules.items()}
        costs = {name: int(entry["in_features"]) + int(entry["out_features"]) for name, entry in modules.items()}
        rank = int(data["lora_r"])
        ranks = {name: int(entry.get("rank", rank)) for name, entry in modules.items()}
    except (KeyError, TypeError, ValueError) as error:
        message = f"'{args.scores}': a module entry lacks score / in_features / out_features ({error})"
        raise UserInputError(message) from None
    plan = make_plan(
        scores,
        args.keep,
        rank,
        costs,
        redistribute=args.redistribute,
        seed=args.seed,
        shortcuts_mode=args.shortcuts_mode,
        ranks=ranks,
    )
    payload = {
        "format": PLAN_FORMAT,
        "scores": args.scores,
        "heuristic": data.get("heuristic"),
        "keep": args.keep,
        "redistribute": args.redistribute,
        "seed": args.seed,
        "shortcuts_mode": args.shortcuts_mode,
        "modules": plan,
    }
    write_text_atomically(args.out, yaml.safe_dump(payload, sort_keys=False))
    if args.peft_out is not None:
        alpha = args.alpha or data.get("lora_alpha")
        if alpha is None:
            raise UserInputError(f"'{args.scores}' does not say the pool's lora_alpha; give --alpha")
        fields = peft_lora_fields(Plan(args.out, plan), rank, float(alpha))
        write_text_atomically(args.peft_out, json.dumps(fields, indent=2) + "\n")
    kept = {name: entry for name, entry in plan.items() if entry["enabled"]}
    before = sum(ranks[name] * costs[name] for name in kept)
    after = sum(entry["rank"] * costs[name] for name, entry in kept.items())
    print(f"kept {len(kept)} of {len(plan)} modules; adapter parameters {after:,} (at their pool ranks: {before:,})")
    for name, entry in kept.items():
        print(f"  r {entry['rank']:>3}  score {entry['score']:.5g}  {name}")
    print(f"plan: {args.out}")
    if args.peft_out is not None:
        print(f"peft LoraConfig fields: {args.peft_out}")
    return 0


def peft_lora_fields(plan: Plan, r: int, alpha: float) -> dict[str, Any]:
    """`peft.LoraConfig` keyword arguments that adapt exactly the plan's LoRA modules at their planned ranks, each at
    the pool's scale alpha / r (as `lora.plan` trains them)."""
    from ranktune.config import LoraSettings

    planned = plan.apply_to_lora(LoraSettings(r=r, alpha=alpha))
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": planned.target_modules,
        "rank_pattern": planned.rank_pattern,
        "alpha_pattern": planned.alpha_pattern,
    }
