"""The catalogue of hostile inputs: one table, each row a bad input → exit code and a phrase of its one error line.

Every row runs the real console script in a fresh workspace (tiny models and files made in code). A row passes when
the command exits with the expected code, stderr holds exactly one `error:` line containing every phrase, no other
stderr line than ranktune's own `[ranktune]` lines and progress bars (no traceback, no library noise), and the row's own
`after` check holds (an input not overwritten, nothing half-written, no code run).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.cli.helpers import run_cli
from tests.conftest import build_tokenizer, save_tiny_model

CONFIG = """\
model: {{name_or_path: {model}, task: classification}}
data: {{train: {train}, max_length: 32}}
lora: {{r: {r}, target_modules: {targets}}}
training: {{max_steps: 2, per_device_train_batch_size: 4, save_strategy: "no"}}
output_dir: {output_dir}
"""


@dataclass
class Workspace:
    """Files a row may use or break: tiny models, a valid classification config and data, saved adapters."""

    root: Path
    bert: Path
    llama: Path
    classifier_adapter: Path
    causal_adapter: Path
    config_values: dict[str, object] = field(default_factory=dict)
    held: list = field(default_factory=list)  # open files a row keeps (a lock held during the command)

    @property
    def train(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def output_dir(self) -> Path:
        return self.root / "out"

    def config(self, **changes: object) -> str:
        """Writes the valid classification config with `changes` applied and returns its path."""
        path = self.root / "run.yaml"
        path.write_text(CONFIG.format(**{**self.config_values, **changes}), encoding="utf-8")
        return str(path)

    def file(self, name: str, content: str | bytes) -> str:
        """Writes a file into the workspace and returns its path."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)


@dataclass(frozen=True)
class Case:
    """One hostile input: the command it runs, the exit code and the phrases its error line must hold."""

    name: str
    argv: Callable[[Workspace], list[str]]
    code: int
    phrases: tuple[str, ...]
    after: Callable[[Workspace], None] | None = None


def _classification_rows(count: int = 20) -> str:
    return "".join(f'{{"text": "example number {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(count))


def _save_adapter(model, tokenizer, folder: Path) -> Path:
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prototype(tmp_path_factory) -> Workspace:
    """Builds the models and adapters once; every row gets its own copy (rows may damage what they use)."""
    root = tmp_path_factory.mktemp("catalogue")
    bert = save_tiny_model(root / "tiny-bert", "bert", "classification")
    llama = save_tiny_model(root / "tiny-llama", "llama", "causal_lm")
    tokenizer = build_tokenizer()
    classifier = AutoModelForSequenceClassification.from_pretrained(bert)
    causal = AutoModelForCausalLM.from_pretrained(llama)
    workspace = Workspace(
        root=root,
        bert=bert,
        llama=llama,
        classifier_adapter=_save_adapter(classifier, tokenizer, root / "classifier-adapter"),
        causal_adapter=_save_adapter(causal, tokenizer, root / "causal-adapter"),
    )
    workspace.train.write_text(_classification_rows(), encoding="utf-8")
    return workspace


@pytest.fixture
def workspace(prototype: Workspace, tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    shutil.copytree(prototype.root, root)
    copy = Workspace(
        root=root,
        bert=root / prototype.bert.name,
        llama=root / prototype.llama.name,
        classifier_adapter=root / prototype.classifier_adapter.name,
        causal_adapter=root / prototype.causal_adapter.name,
    )
    copy.config_values = {
        "model": str(copy.bert),
        "train": str(copy.train),
        "r": 4,
        "targets": "all-linear",
        "output_dir": str(copy.output_dir),
    }
    return copy


def _nothing_in_output_dir(ws: Workspace) -> None:
    assert not ws.output_dir.exists() or not any(ws.output_dir.glob("adapter_*")), list(ws.output_dir.iterdir())


USER_FILE = b"a file of the user's\n"


def _unchanged(path: Path, content: bytes) -> None:
    assert path.read_bytes() == content


def _absent(path: Path) -> None:
    assert not path.exists()


def _exists(path: Path) -> None:
    assert path.exists()


def _mkdir(path: Path) -> list[str]:
    """Creates a folder while building the command line; adds no argument."""
    path.mkdir(parents=True)
    return []


def _user_file(path: Path) -> list[str]:
    """Puts a user's own file at `path`; adds no argument."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(USER_FILE)
    return []


def _hold_lock(ws: Workspace) -> list[str]:
    """Takes output_dir's run lock as a running `ranktune train` would (released when the test's process ends)."""
    ws.output_dir.mkdir(parents=True, exist_ok=True)
    lock = ws.output_dir / ".ranktune.lock"
    lock.write_text(json.dumps({"pid": 4242, "started": "2026-12-01T10:00:00+0000"}))
    ws.held.append(lock.open("r+"))
    fcntl.flock(ws.held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    return []


def _set_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


CASES: list[Case] = [
    # --- config files and overrides ---
    Case("missing config", lambda ws: ["train", str(ws.root / "absent.yaml")], 2, ("config file not found",)),
    Case(
        "malformed YAML",
        lambda ws: ["train", ws.file("bad.yaml", "model: {name_or_path: x\n")],
        2,
        ("malformed YAML", "line"),
    ),
    Case(
        "config not UTF-8",
        lambda ws: ["train", ws.file("latin1.yaml", "model: {name_or_path: caf\xe9}\n".encode("latin-1"))],
        2,
        ("cannot read config file",),
    ),
    Case("unknown key", lambda ws: ["train", ws.config(), "lora.alpah=4"], 2, ("unknown key 'lora.alpah'", "'alpha'")),
    Case("wrong type", lambda ws: ["train", ws.config(r="big")], 2, ("'lora.r'", "integer")),
    Case("rank zero", lambda ws: ["train", ws.config(r=0)], 2, ("'lora.r'", "greater than 0")),
    Case(
        "target_modules matching nothing",
        lambda ws: ["train", ws.config(targets="[q_proj]")],
        2,
        ("matches no linear module", "query", "value", "dense"),
    ),
    # --- data files ---
    Case("missing data file", lambda ws: ["train", ws.config(train=ws.root / "none.jsonl")], 2, ("none.jsonl",)),
    Case("empty data file", lambda ws: ["train", ws.config(train=ws.file("empty.jsonl", ""))], 2, ("empty.jsonl",)),
    Case(
        "missing label column",
        lambda ws: ["train", ws.config(train=ws.file("nolabel.jsonl", '{"text": "a", "target": 1}\n' * 10))],
        2,
        ("label", "target", "text"),
    ),
    Case(
        "missing text column",
        lambda ws: ["train", ws.config(train=ws.file("notext.jsonl", '{"sentence": "a", "label": 1}\n' * 10))],
        2,
        ("'text'", "sentence", "label"),
    ),
    Case(
        "label outside num_labels",
        lambda ws: [
            "train",
            ws.config(
                train=ws.file("labels.jsonl", "".join(f'{{"text": "t{i}", "label": {i % 3}}}\n' for i in range(12)))
            ),
            "model.num_labels=2",
        ],
        2,
        ("label 2 is outside [0, 2)",),
    ),
    # --- output folders ---
    Case(
        "output_dir below a file",
        lambda ws: ["train", ws.config(output_dir=Path(ws.file("a-file", "")) / "out")],
        2,
        ("not writable",),
    ),
    Case(
        "output_dir that is a file",
        lambda ws: ["train", ws.config(output_dir=ws.file("a-file", "keep"))],
        2,
        ("is a file; expected a folder",),
        after=lambda ws: _unchanged(ws.root / "a-file", b"keep"),
    ),
    Case(
        "earlier run's checkpoint without --overwrite",
        lambda ws: ["train", ws.config(), *_mkdir(ws.output_dir / "checkpoint-500")],
        2,
        ("earlier run", "checkpoint-500", "--overwrite"),
        after=lambda ws: _exists(ws.output_dir / "checkpoint-500"),
    ),
    Case(
        "a user's metrics.jsonl in output_dir",
        lambda ws: ["train", ws.config(), *_user_file(ws.output_dir / "metrics.jsonl")],
        2,
        ("metrics.jsonl", "ranktune did not write"),
        after=lambda ws: _unchanged(ws.output_dir / "metrics.jsonl", USER_FILE),
    ),
    Case(
        "a user's metrics.jsonl in output_dir, with --overwrite",
        lambda ws: ["train", ws.config(), "--overwrite", *_user_file(ws.output_dir / "metrics.jsonl")],
        2,
        ("metrics.jsonl", "ranktune did not write"),
        after=lambda ws: _unchanged(ws.output_dir / "metrics.jsonl", USER_FILE),
    ),
    Case(
        "output_dir used by another run",
        lambda ws: ["train", ws.config(), *_hold_lock(ws)],
        2,
        ("in use by another ranktune run", "started"),
        after=_nothing_in_output_dir,
    ),
    # --- adapter folders and the commands that read them ---
    Case(
        "eval batch size 0",
        lambda ws: ["eval", str(ws.classifier_adapter), "--data", str(ws.train), "--batch-size", "0"],
        2,
        ("--batch-size",),
    ),
    *(
        Case(
            f"{verb} on a folder that is not an adapter",
            lambda ws, verb=verb, extra=extra: [verb, str(ws.root), *extra(ws)],
            2,
            ("is not an adapter directory",),
            after=lambda ws: _absent(ws.root / "merged"),
        )
        for verb, extra in (
            ("eval", lambda ws: ["--data", "x.jsonl"]),
            ("inspect", lambda ws: []),
            ("merge", lambda ws: ["--out", str(ws.root / "merged")]),
            ("generate", lambda ws: ["--prompt", "hi"]),
        )
    ),
]


def _is_progress_bar(line: str) -> bool:
    """A tqdm line (loading weights, mapping a dataset): progress, not noise."""
    return "%|" in line and ("it/s" in line or "s/it" in line)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input(case: Case, workspace: Workspace) -> None:
    result: subprocess.CompletedProcess = run_cli(*case.argv(workspace), cwd=workspace.root)
    assert result.returncode == case.code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    noise = [line for line in lines if not line.startswith(("error:", "[ranktune]")) and not _is_progress_bar(line)]
    assert len(errors) == 1, result.stderr
    assert not noise, result.stderr
    for phrase in case.phrases:
        assert phrase in errors[0], (phrase, errors[0])
    if case.after is not None:
        case.after(workspace)
    for held in workspace.held:
        held.close()
