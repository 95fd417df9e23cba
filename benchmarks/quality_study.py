"""What the quality study compares: its tasks, its methods with their tuning grids, and its profiles.

Every method of a profile gets the same tuning budget on a task: the task's learning rates times two values of the
method's own knob (an equal-sized grid), chosen on validation data with the first seed; the chosen setting then
runs with the remaining seeds, and the test split is read only for those runs. The budget every adaptive method is
matched to is LoRA r 8 on all linear layers: L1RA and AdaLoRA end at the same total rank, HeteroLoRA keeps a quarter
(or a half) of a pool four (or two) times that rank.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

BUDGET_R = 8  # every adaptive method is matched to LoRA r 8 on all linear layers


@dataclass(frozen=True)
class Task:
    """A model, its data and the training settings every method shares.

    Attributes:
        name: a short id, used in file names.
        title: what the report calls it.
        model: the config's `model` section.
        data: the config's `data` section (validation and test files included).
        training: `training` keys shared by every run of the task.
        learning_rates: the learning-rate half of every method's grid.
        metric: the validation and test metric the study selects and reports on.
        higher_is_better: the metric's direction (accuracy: True; loss: False).
        second_metric: reported beside it.
        knobs_tuned: False tunes the learning rate only (each method's knob stays at its first value).
        saliency_batches: batches a static HeteroLoRA search scores over.
    """

    name: str
    title: str
    model: dict[str, Any]
    data: dict[str, Any]
    training: dict[str, Any]
    learning_rates: tuple[float, ...]
    metric: str
    higher_is_better: bool
    second_metric: str
    knobs_tuned: bool = True
    saliency_batches: int = 16


@dataclass(frozen=True)
class Method:
    """One way to spend the parameter budget.

    Attributes:
        name: a short id, used in file names.
        label: what the report calls it.
        sections: config sections (lora, allocation, shortcuts) before the knob is applied.
        knob: the dotted config key the method tunes, and its two values.
        static_search: for static HeteroLoRA, the saliency heuristic: `ranktune saliency` then `ranktune plan`
            run before training, and the plan is the run's `lora.plan`; the pool is the `lora` section.
        pool: a HeteroLoRA pool, kept at the r-8 budget whatever its rank (see `pool_settings`).
        lora_r: the uniform rank of a plain LoRA method (it draws the LoRA line in the plot), else None.
    """

    name: str
    label: str
    sections: dict[str, Any]
    knob: tuple[str, tuple[Any, ...]]
    static_search: str | None = None
    pool: bool = False
    lora_r: int | None = None


@dataclass(frozen=True)
class GridPoint:
    """One setting of a method: its learning rate and knob value."""

    learning_rate: float
    knob_value: Any

    def describe(self, method: Method) -> str:
        """`lr 0.001, l1ra_lambda 0.3`: the setting in the words of the report."""
        return f"lr {self.learning_rate:g}, {method.knob[0].split('.')[-1]} {self.knob_value}"


@dataclass(frozen=True)
class Profile:
    """A whole study: tasks, methods and seeds."""

    name: str
    tasks: tuple[Task, ...]
    methods: tuple[Method, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    notes: tuple[str, ...] = field(default_factory=tuple)


def grid(task: Task, method: Method) -> list[GridPoint]:
    """The method's tuning grid on a task: learning rates × knob values (first knob value only if not tuned)."""
    values = method.knob[1] if task.knobs_tuned else method.knob[1][:1]
    return [GridPoint(lr, value) for value in values for lr in task.learning_rates]


def _set_dotted(sections: dict[str, Any], dotted: str, value: Any) -> None:
    node = sections
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def run_config(task: Task, method: Method, point: GridPoint, seed: int, output_dir: str) -> dict[str, Any]:
    """The full `ranktune train` config (a plain mapping) of one run."""
    sections = copy.deepcopy(method.sections)
    _set_dotted(sections, method.knob[0], point.knob_value)
    if method.pool:
        sections = pool_settings(sections)
    if sections["allocation"].get("method") == "adalora":
        sections["lora"]["alpha"] = float(2 * sections["allocation"]["init_r"])  # PEFT scales it by alpha / init_r
    training = {**task.training, "learning_rate": point.learning_rate, "seed": seed}
    return {
        "model": copy.deepcopy(task.model),
        "data": copy.deepcopy(task.data),
        **sections,
        "training": training,
        "output_dir": output_dir,
    }


def keep_fraction(r: int) -> float:
    """The share of a HeteroLoRA pool of rank r that spends the r-8 budget."""
    return BUDGET_R / r


def pool_settings(sections: dict[str, Any]) -> dict[str, Any]:
    """Keeps a HeteroLoRA pool at the r-8 budget whatever its rank: keep = 8 / r, alpha = 2r (the scale of 2 that
    LoRA r 8 with alpha 16 has). Applied after the knob, so `lora.r` 16 keeps a half of an r-16 pool."""
    r = sections["lora"]["r"]
    sections["lora"]["alpha"] = float(2 * r)
    if sections["allocation"].get("method") == "hetero":
        sections["allocation"]["keep"] = keep_fraction(r)
    return sections


def run_id(config: dict[str, Any], method: Method, task: Task) -> str:
    """A short hash of everything that defines a run (not where it is written): the cache key of its record.

    Not the code: after changing ranktune, rerun the study with `--fresh`.
    """
    defining = {key: value for key, value in config.items() if key != "output_dir"}
    defining["static_search"] = [method.static_search, task.saliency_batches] if method.static_search else None
    return _digest(defining)


def baseline_id(task: Task) -> str:
    """The cache key of a task's untrained baseline: its model and data, nothing a method sets."""
    return "baseline-" + _digest({"model": task.model, "data": task.data})


def _digest(mapping: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(mapping, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --- methods ----------------------------------------------------------------------------------------------------


def _lora(r: int) -> dict[str, Any]:
    return {"r": r, "alpha": 2 * r, "dropout": 0.05, "target_modules": "all-linear"}


def methods(l1ra_lambdas: tuple[float, float]) -> tuple[Method, ...]:
    """The methods of every profile: plain LoRA at three ranks, then each adaptive method at the r-8 budget.

    Knobs: LoRA's alpha (alpha = r and alpha = 2r, the two conventions users type); L1RA's lambda (its
    regularisation strength, `l1ra_lambdas`: a shorter run needs a stronger one for ranks to move; eta_c 0.05 as in
    the demo); AdaLoRA's init_r (how much it starts with and prunes away to target_r 8); HeteroLoRA's pool (r 32
    keeping a quarter, or r 16 keeping a half: the same budget either way); for HeteroLoRA with shortcut
    connections, their alpha.
    """
    methods_: list[Method] = [
        Method(
            f"lora-r{r}",
            f"LoRA r {r}",
            {"lora": _lora(r), "allocation": {"method": "none"}},
            ("lora.alpha", (float(2 * r), float(r))),
            lora_r=r,
        )
        for r in (4, 8, 16)
    ]
    l1ra = {"method": "l1ra", "eta_c": 0.05, "rank_update_ratio": 0.1}
    methods_ += [
        Method(
            "l1ra-ranks",
            "L1RA (budget: ranks)",
            {"lora": _lora(BUDGET_R), "allocation": {**l1ra, "budget": "ranks"}},
            ("allocation.l1ra_lambda", l1ra_lambdas),
        ),
        Method(
            "l1ra-params",
            "L1RA (budget: parameters)",
            {"lora": _lora(BUDGET_R), "allocation": {**l1ra, "budget": "params"}},
            ("allocation.l1ra_lambda", l1ra_lambdas),
        ),
        Method(
            "adalora",
            "AdaLoRA",
            {"lora": _lora(BUDGET_R), "allocation": {"method": "adalora", "target_r": BUDGET_R}},
            ("allocation.init_r", (12, 16)),
        ),
        Method(
            "hetero-static",
            "HeteroLoRA static (grad_norm)",
            {"lora": _lora(32), "allocation": {"method": "none"}},
            ("lora.r", (32, 16)),
            static_search="grad_norm",
            pool=True,
        ),
        Method(
            "hetero-dynamic",
            "HeteroLoRA dynamic (online grad_norm)",
            {"lora": _lora(32), "allocation": {"method": "hetero", "online": True}},
            ("lora.r", (32, 16)),
            pool=True,
        ),
        Method(
            "hetero-shortcuts",
            "HeteroLoRA dynamic + shortcuts",
            {
                "lora": _lora(32),
                "allocation": {"method": "hetero", "online": True, "shortcuts_mode": "combined"},
                "shortcuts": {"r": BUDGET_R, "alpha": 4.0},
            },
            ("shortcuts.alpha", (4.0, 16.0)),
            pool=True,
        ),
    ]
    return tuple(methods_)


# --- profiles -----------------------------------------------------------------------------------------------------

_ROTTEN = {
    "train": "asset:rotten-tomatoes/train.jsonl",
    "validation": "asset:rotten-tomatoes/validation.jsonl",
    "test": "asset:rotten-tomatoes/test.jsonl",
    "text_column": "text",
    "label_column": "label",
}
_QA = {
    "train": "asset:chatterbot-qa/train.jsonl",
    "validation": "asset:chatterbot-qa/validation.jsonl",
    "test": "asset:chatterbot-qa/test.jsonl",
    "format": "prompt_completion",
}
_QUIET = {"save_strategy": "no", "eval_strategy": "no", "logging_steps": 10, "disable_tqdm": True}


def _training(epochs: int, batch: int, eval_batch: int) -> dict[str, Any]:
    return {**_QUIET, "num_train_epochs": epochs, "per_device_train_batch_size": batch,
            "per_device_eval_batch_size": eval_batch, "warmup_ratio": 0.1}  # fmt: skip


def rotten_tomatoes(data: dict[str, Any], training: dict[str, Any], learning_rates: tuple[float, ...],
                    saliency_batches: int) -> Task:  # fmt: skip
    """MiniLM-L6 classifying Rotten Tomatoes snippets; `data` adds sizes to the asset's splits."""
    return Task(
        name="minilm-rotten-tomatoes",
        title="MiniLM-L6 on Rotten Tomatoes (sentiment)",
        model={"name_or_path": "asset:minilm-l6", "task": "classification"},
        data={**_ROTTEN, **data},
        training=training,
        learning_rates=learning_rates,
        metric="accuracy",
        higher_is_better=True,
        second_metric="macro_f1",
        saliency_batches=saliency_batches,
    )


def qa_pairs(data: dict[str, Any], training: dict[str, Any], learning_rates: tuple[float, ...],
             saliency_batches: int, knobs_tuned: bool) -> Task:  # fmt: skip
    """SmolLM2-135M-Instruct learning the Q&A pairs' answers; `data` adds sizes to the asset's splits."""
    return Task(
        name="smollm2-qa",
        title="SmolLM2-135M-Instruct on the Q&A pairs (loss on the answers)",
        model={"name_or_path": "asset:smollm2-135m", "task": "causal_lm"},
        data={**_QA, **data},
        training=training,
        learning_rates=learning_rates,
        metric="loss",
        higher_is_better=False,
        second_metric="perplexity",
        knobs_tuned=knobs_tuned,
        saliency_batches=saliency_batches,
    )


def cpu_profile() -> Profile:
    """The default: about an hour on 2 CPU cores."""
    minilm = rotten_tomatoes({"max_length": 64, "max_train_samples": 1600, "max_eval_samples": 500},
                             _training(1, 32, 64), (1e-3, 2e-3), saliency_batches=16)  # fmt: skip
    smollm2 = qa_pairs({"max_length": 128, "max_train_samples": 160, "max_eval_samples": 64},
                       _training(1, 8, 16), (1e-3, 2e-3), saliency_batches=8, knobs_tuned=False)  # fmt: skip
    return Profile(
        "cpu",
        (minilm, smollm2),
        methods(l1ra_lambdas=(0.3, 1.0)),
        notes=(
            "MiniLM: 1,600 training rows, 1 epoch (50 optimizer steps of 32), 500 validation rows, the whole "
            "1,275-row test split.",
            "SmolLM2: 160 training pairs, 1 epoch (20 optimizer steps of 8), the 56 validation and 54 test pairs "
            "(their prompts never occur in training); the learning rate alone is tuned there (each knob at its first "
            "value) to fit the hour.",
        ),
    )


def gpu_profile() -> Profile:
    """Larger settings for a GPU (bf16 is ranktune's default there): full data, more epochs, three learning rates."""
    minilm = rotten_tomatoes({"max_length": 128}, _training(3, 32, 128), (5e-4, 1e-3, 2e-3), saliency_batches=32)
    smollm2 = qa_pairs({"max_length": 128}, _training(2, 16, 32), (2e-4, 5e-4, 1e-3), saliency_batches=32,
                       knobs_tuned=True)  # fmt: skip
    return Profile(
        "gpu",
        (minilm, smollm2),
        methods(l1ra_lambdas=(0.1, 0.3)),
        notes=("MiniLM: the whole 10,202-row training split, 3 epochs; SmolLM2: all 1,066 training pairs, 2 epochs.",),
    )


PROFILES = {"cpu": cpu_profile, "gpu": gpu_profile}
