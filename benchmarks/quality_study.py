"""What the quality study compares: its tasks, its methods at two parameter budgets, and its profiles.

LoRA at r 1, 2, 4, 8 and 16 on every linear layer is the frontier every method is placed against (quality against
adapter parameters). The other methods are matched in parameters to LoRA r 2 or r 8: the gradient method and L1RA
spend LoRA r's parameters by construction; EVA and AdaLoRA keep its total rank (their parameter count is measured and
reported, and the frontier comparison uses it). Every method gets the same tuning: three learning rates (a method
whose regime differs, AdaLoRA, gets the same three shifted by a fixed factor), chosen on validation with the first
seed; a choice at the grid's edge extends the grid by one more step that way, twice at most. The chosen learning rate
then runs with every seed; seeds are paired across methods (seed s gives every method the same data order).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

STUDY_VERSION = 2  # part of every run id: raise it when a change to ranktune changes what a run computes
FRONTIER_RANKS = (1, 2, 4, 8, 16)
BUDGET_RANKS = (2, 8)
LR_STEP = 2.0  # neighbouring learning rates of a grid differ by this factor; an extension adds one more
MAX_EXTENSIONS = 2
BASE_POINTS = 3  # learning rates every method starts with


@dataclass(frozen=True)
class Task:
    """A model, its data and the training settings every method shares.

    Attributes:
        name: a short id, used in file names and records.
        title: what the report calls it.
        model: the config's `model` section.
        data: the config's `data` section without the test file (validation included).
        test: the test file, scored with `ranktune eval` on every saved adapter (selection never reads it).
        test_samples: how many test rows are scored (None: all).
        training: `training` keys shared by every run of the task (max_steps, batch, evaluation steps).
        learning_rates: the grid every method starts from.
        metric: the metric the study selects and reports on (validation and test).
        higher_is_better: the metric's direction (accuracy: True; loss: False).
        second_metric: reported beside it.
    """

    name: str
    title: str
    model: dict[str, Any]
    data: dict[str, Any]
    test: str
    training: dict[str, Any]
    learning_rates: tuple[float, ...]
    metric: str
    higher_is_better: bool
    second_metric: str
    test_samples: int | None = None
    lora: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.training["max_steps"])


@dataclass(frozen=True)
class Method:
    """One way to spend a parameter budget.

    Attributes:
        name: a short id, used in file names and records.
        label: what the report calls it.
        budget_r: the LoRA rank whose adapter parameters it is matched to.
        sections: the config's `lora` and `allocation` sections.
        lr_factor: its grid is the task's grid times this (1 for all but a method with its own regime).
        frontier: part of LoRA's parameter curve.
        note: what it tests, in the report.
        versus: the name of another method the report also pairs it with, seed by seed.
        reallocate_every: for HeteroLoRA's search, the fraction of the run between reallocations (`every` is set to
            that many of the task's steps; 1.0: only the selection before step 0).
        peer: the LoRA method it is matched to in the report's "LoRA budget" and "vs LoRA at its budget" columns
            (default: LoRA r `budget_r` on every linear layer).
        baseline: a LoRA placement to compare against, not a ranktune method: never counted toward the target.
    """

    name: str
    label: str
    budget_r: int
    sections: dict[str, Any]
    lr_factor: float = 1.0
    frontier: bool = False
    note: str = ""
    versus: str | None = None
    reallocate_every: float | None = None
    peer: str | None = None
    baseline: bool = False


@dataclass(frozen=True)
class Profile:
    """A whole study: tasks, methods and seeds."""

    name: str
    tasks: tuple[Task, ...]
    methods: tuple[Method, ...]
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    notes: tuple[str, ...] = field(default_factory=tuple)


def base_grid(task: Task, method: Method) -> tuple[float, ...]:
    """The method's first three learning rates on a task."""
    return tuple(_round(lr * method.lr_factor) for lr in task.learning_rates)


def _round(lr: float) -> float:
    return float(f"{lr:.3g}")


def extension(grid: list[float], chosen: float) -> float | None:
    """The learning rate that extends `grid` past `chosen` when `chosen` is at its edge, else None; None as well
    once the grid has been extended MAX_EXTENSIONS times (the report then says the choice is at the edge)."""
    if len(grid) >= BASE_POINTS + MAX_EXTENSIONS:
        return None
    ordered = sorted(grid)
    if chosen == ordered[-1]:
        return _round(chosen * LR_STEP)
    if chosen == ordered[0]:
        return _round(chosen / LR_STEP)
    return None


def run_config(task: Task, method: Method, learning_rate: float, seed: int, output_dir: str) -> dict[str, Any]:
    """The full `ranktune train` config (a plain mapping) of one run."""
    sections = copy.deepcopy(method.sections)
    sections["lora"] = {**sections["lora"], **copy.deepcopy(task.lora)}
    if method.reallocate_every is not None:
        sections["allocation"]["every"] = max(1, round(method.reallocate_every * task.steps))
    return {
        "model": copy.deepcopy(task.model),
        "data": copy.deepcopy(task.data),
        **sections,
        "training": {**task.training, "learning_rate": learning_rate, "seed": seed},
        "output_dir": output_dir,
    }


def run_id(task: Task, method: Method, learning_rate: float, seed: int) -> str:
    """A short hash of everything that defines a run (not where it is written): the key of its record."""
    config = run_config(task, method, learning_rate, seed, "")
    defining = {key: value for key, value in config.items() if key != "output_dir"}
    defining["test"] = [task.test, task.test_samples]
    defining["study_version"] = STUDY_VERSION
    return hashlib.sha1(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --- methods ----------------------------------------------------------------------------------------------------


def _lora(r: int) -> dict[str, Any]:
    return {"r": r, "alpha": float(2 * r), "dropout": 0.05, "target_modules": "all-linear"}


# L1RA's settings in the study: gates strong enough to prune within a few hundred steps, the budget in parameters.
L1RA_SETTINGS = {"method": "l1ra", "l1ra_lambda": 0.3, "eta_c": 0.05, "rank_update_ratio": 0.1, "budget": "params"}


# HeteroLoRA's search in the study: LoRA modules only (no shortcut connections), so the adapter is plain LoRA and
# its parameters sit on LoRA's curve; a quarter of the r 8 pool is about LoRA r 2's parameters. The dynamic search
# reallocates every quarter of the run (CPU profile: at steps 0, 75, 150 and 225); the static one never after step 0.
HETERO_SEARCH = {"method": "hetero", "heuristic": "grad_norm", "keep": 0.25, "batches": 8}


# Below LoRA r 1 on every linear layer, the curve's smallest point, placement is all there is to choose: LoRA r 1 on
# query and value (PEFT's default targets for BERT and llama, a third of the modules and under a quarter of r 1's
# parameters), on one module (next to nothing besides the head and pooler every method trains: how much LoRA adds at
# all), and HeteroLoRA's data-driven choice of a quarter of the r 1 modules. PEFT matches a string as a regex.
QUERY_VALUE = r".*\.(query|value|q_proj|v_proj)"
ONE_MODULE = r".*\.(layer\.0\.attention\.self\.query|layers\.0\.self_attn\.q_proj)"


def below_r1() -> list[Method]:
    """LoRA at budgets under r 1 on every linear layer, and HeteroLoRA's choice of modules at such a budget."""
    none = {"method": "none"}
    return [
        Method(
            "lora-qv-r1",
            "LoRA r 1 on query and value",
            1,
            {"lora": {**_lora(1), "target_modules": QUERY_VALUE}, "allocation": none},
            baseline=True,
            note="PEFT's default placement: the attention's query and value projections of every layer",
        ),
        Method(
            "lora-one-r1",
            "LoRA r 1 on one module",
            1,
            {"lora": {**_lora(1), "target_modules": ONE_MODULE}, "allocation": none},
            baseline=True,
            note="the first layer's query projection only: what the head and pooler (trained by every method) reach "
            "almost alone",
        ),
        Method(
            "hetero-static-r1",
            "HeteroLoRA static: a quarter of the r 1 pool",
            1,
            {"lora": _lora(1), "allocation": dict(HETERO_SEARCH)},
            reallocate_every=1.0,
            peer="lora-qv-r1",
            note="grad_norm over 8 batches before step 0 picks a quarter of the r 1 modules (PEFT's default "
            "placement takes a third)",
        ),
    ]


def methods(l1ra: bool = True) -> tuple[Method, ...]:
    """LoRA's curve, then the data-driven methods at the r 8 budget (the gradient method also at r 2), its two
    ablations, the methods that move ranks during training (L1RA alone only with `l1ra`; L1RA started from the
    gradient method always, as the test of composing the two), and the budgets below LoRA r 1 (`below_r1`)."""
    frontier = [
        Method(f"lora-r{r}", f"LoRA r {r}", r, {"lora": _lora(r), "allocation": {"method": "none"}}, frontier=True)
        for r in FRONTIER_RANKS
    ]
    gradient = [
        Method(
            f"gradient-r{r}",
            f"gradient (ranks + init) at r {r}",
            r,
            {"lora": _lora(r), "allocation": {"method": "gradient", "rho": 2.0, "batches": 8}},
            note="ranks from the gradient's spectrum under the parameter budget, A from its top singular vectors",
        )
        for r in BUDGET_RANKS
    ]
    others = [
        Method(
            "gradient-ranks-r8",
            "gradient ranks, LoRA init at r 8",
            8,
            {"lora": _lora(8), "allocation": {"method": "gradient", "rho": 2.0, "batches": 8, "init": "lora"}},
            note="ablation: the gradient method's allocation alone",
        ),
        Method(
            "gradient-init-r8",
            "uniform r 8, gradient init",
            8,
            {"lora": _lora(8), "allocation": {"method": "gradient", "rho": 1.0, "batches": 8}},
            note="ablation: the gradient method's initialisation alone",
        ),
        Method(
            "gradient-step-r8",
            "gradient ranks, one-step start at r 8",
            8,
            {
                "lora": _lora(8),
                "allocation": {"method": "gradient", "rho": 2.0, "batches": 8, "init": "step", "init_steps": 10.0},
            },
            note="the gradient's ranks and A, and B where 10 Adam steps down its gradient would take it",
        ),
        Method(
            "hetero-static-r2",
            "HeteroLoRA static: a quarter of the r 8 pool",
            2,
            {"lora": _lora(8), "allocation": dict(HETERO_SEARCH)},
            reallocate_every=1.0,
            note="grad_norm over 8 batches before step 0 picks a quarter of the r 8 modules and the choice stays (what "
            "`ranktune saliency` + `plan` give)",
        ),
        Method(
            "hetero-dynamic-r2",
            "HeteroLoRA dynamic: a quarter of the r 8 pool",
            2,
            {"lora": _lora(8), "allocation": dict(HETERO_SEARCH)},
            reallocate_every=0.25,
            note="the same quarter of the r 8 pool chosen again every quarter of the run, each time over 8 freshly "
            "drawn batches, every candidate scored as a fresh module",
            versus="hetero-static-r2",
        ),
        Method(
            "eva-r8",
            "EVA at r 8",
            8,
            {"lora": _lora(8), "allocation": {"method": "eva", "rho": 2.0, "batches": 8}},
            note="ranks and A from the explained variance of each module's inputs (PEFT's EVA); keeps the total rank",
        ),
        Method(
            "l1ra-r8",
            "L1RA at r 8 (budget: parameters)",
            8,
            {"lora": _lora(8), "allocation": L1RA_SETTINGS},
            note="L1 gates prune rank components during training and hand them to other modules",
        ),
        Method(
            "gradient-l1ra-r8",
            "gradient start, L1RA refinement at r 8",
            8,
            {
                "lora": _lora(8),
                "allocation": {**L1RA_SETTINGS, "start": {"method": "gradient", "rho": 2.0, "batches": 8}},
            },
            note="the gradient method's ranks and A at step 0, then L1RA's gates move ranks during training",
        ),
        Method(
            "adalora-r8",
            "AdaLoRA at r 8",
            8,
            {"lora": {**_lora(8), "alpha": 24.0}, "allocation": {"method": "adalora", "init_r": 12, "target_r": 8}},
            lr_factor=4.0,
            note="PEFT's AdaLoRA, init_r 12 pruned to a total rank of r 8; its learning rates four times the others'",
        ),
    ]
    others += below_r1()
    return (*frontier, *gradient, *(m for m in others if l1ra or not m.name.startswith("l1ra")))


# --- tasks --------------------------------------------------------------------------------------------------------


def _training(steps: int, batch: int, evaluations: int, eval_batch: int) -> dict[str, Any]:
    return {
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": eval_batch,
        "warmup_ratio": 0.1,
        "eval_strategy": "steps",
        "eval_steps": steps // evaluations,
        "save_strategy": "no",
        "logging_steps": steps // evaluations,
        "disable_tqdm": True,
    }


# MiniLM-L6 is a sentence-transformers checkpoint: its pooler (the dense layer over the first token that BERT's
# classifier reads) was never trained for its mean-pooled embeddings, and its output barely varies between inputs
# (std 0.037 over Rotten Tomatoes rows). With LoRA on it, runs got stuck predicting the majority class at random
# (LoRA r 4, learning rate 1e-3, seed 0: 0.598 validation accuracy, while r 1 and r 2 reached 0.78); trained in full,
# like the head, the same run reached 0.793. Every method gets it the same way; it is not counted in the adapter
# parameters.
MINILM_LORA = {"exclude_modules": ["pooler.dense"], "modules_to_save": ["pooler"]}


def _minilm(name: str, title: str, data: dict[str, Any], test: str, training: dict[str, Any],
            learning_rates: tuple[float, ...], test_samples: int | None = None) -> Task:  # fmt: skip
    return Task(
        name=name,
        title=title,
        model={"name_or_path": "asset:minilm-l6", "task": "classification"},
        data=data,
        test=test,
        training=training,
        learning_rates=learning_rates,
        metric="accuracy",
        higher_is_better=True,
        second_metric="macro_f1",
        test_samples=test_samples,
        lora=MINILM_LORA,
    )


def encoder_tasks(steps: int, batch: int, evaluations: int, learning_rates: tuple[float, ...]) -> tuple[Task, ...]:
    """MiniLM-L6 on Rotten Tomatoes, SNLI (sentence pairs) and TREC; 1,000 validation rows each (SNLI's test: a
    seeded 2,000 of its 9,824 rows, to keep every run's test scoring short)."""
    training = _training(steps, batch, evaluations, eval_batch=128)
    rotten = {"train": "asset:rotten-tomatoes/train.jsonl", "validation": "asset:rotten-tomatoes/validation.jsonl",
              "max_length": 64, "max_eval_samples": 1000}  # fmt: skip
    snli = {"train": "asset:snli/train.jsonl", "validation": "asset:snli/validation.jsonl",
            "text_column": "premise", "text_pair_column": "hypothesis", "max_length": 64,
            "max_train_samples": steps * batch, "max_eval_samples": 1000}  # fmt: skip
    trec = {"train": "asset:trec/train.jsonl", "validation": "asset:trec/validation.jsonl", "max_length": 32}
    return (
        _minilm(
            "minilm-rotten-tomatoes",
            "MiniLM-L6 on Rotten Tomatoes (sentiment, 2 classes)",
            rotten,
            "asset:rotten-tomatoes/test.jsonl",
            training,
            learning_rates,
        ),
        _minilm(
            "minilm-snli",
            "MiniLM-L6 on SNLI (sentence pairs, 3 classes)",
            snli,
            "asset:snli/test.jsonl",
            training,
            learning_rates,
            test_samples=2000,
        ),
        _minilm(
            "minilm-trec",
            "MiniLM-L6 on TREC (question type, 6 classes)",
            trec,
            "asset:trec/test.jsonl",
            training,
            learning_rates,
        ),
    )


def qa_task(steps: int, batch: int, evaluations: int, learning_rates: tuple[float, ...]) -> Task:
    """SmolLM2-135M-Instruct learning the Q&A pairs' answers (loss on the answers only)."""
    return Task(
        name="smollm2-qa",
        title="SmolLM2-135M-Instruct on the Q&A pairs (loss on the answers)",
        model={"name_or_path": "asset:smollm2-135m", "task": "causal_lm"},
        data={
            "train": "asset:chatterbot-qa/train.jsonl",
            "validation": "asset:chatterbot-qa/validation.jsonl",
            "format": "prompt_completion",
            "max_length": 96,
        },
        test="asset:chatterbot-qa/test.jsonl",
        training=_training(steps, batch, evaluations, eval_batch=16),
        learning_rates=learning_rates,
        metric="loss",
        higher_is_better=False,
        second_metric="perplexity",
    )


def cpu_profile() -> Profile:
    """The CPU study: two runs at a time, one thread each, on 2 cores. L1RA, which the papers ran for thousands of
    steps, is left to the gpu profile."""
    return Profile(
        "cpu",
        (*encoder_tasks(300, 8, 2, (1e-3, 2e-3, 4e-3)), qa_task(100, 8, 2, (2e-3, 4e-3, 8e-3))),
        methods(l1ra=False),
        notes=(
            "MiniLM tasks: 300 optimizer steps of 8 rows, sequences cut at 64 tokens (TREC: 32), validation on "
            "1,000 rows at steps 150 and 300 (evaluating 1,000 rows costs about as much as 150 training steps here, so "
            "time to quality is read at half the run and at its end).",
            "SmolLM2: 100 optimizer steps of 8 pairs, sequences cut at 96 tokens, validation on the 56 validation "
            "pairs (all there are) at steps 50 and 100. Its grid starts at 2e-3: from 2.5e-4, LoRA r 1 still chose "
            "the edge (4e-3) after both extensions.",
            "Below LoRA r 1 on every linear layer (the curve's smallest point) the study places LoRA r 1 by hand "
            "(query and value; one module) and by HeteroLoRA's saliency: these are LoRA placements, not points of "
            "the curve, and the two by hand are baselines that the target does not count.",
        ),
    )


def gpu_profile() -> Profile:
    """The long schedules, for a GPU: 3,000 steps of 32 on the encoder tasks, 1,000 steps of 16 on SmolLM2."""
    return Profile(
        "gpu",
        (*encoder_tasks(3000, 32, 10, (2.5e-4, 5e-4, 1e-3)), qa_task(1000, 16, 10, (1e-4, 2e-4, 4e-4))),
        methods(),
        notes=("Encoder tasks: 3,000 steps of 32 rows; SmolLM2: 1,000 steps of 16 pairs.",),
    )


PROFILES = {"cpu": cpu_profile, "gpu": gpu_profile}
