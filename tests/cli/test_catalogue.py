"""The catalogue of hostile inputs: one table, each row a bad input → exit code and a phrase of its one error line.

Every row runs the console script's `main` in a process of its own (forked from one that imported the libraries
once, `helpers.ForkingCli`) in a fresh workspace (tiny models and files made in code). A row passes when
the command exits with the expected code, stderr holds exactly one `error:` line containing every phrase, no other
stderr line than ranktune's own `[ranktune]` lines and progress bars (no traceback, no library noise), and the row's own
`after` check holds (an input not overwritten, nothing half-written, no code run).
"""

from __future__ import annotations

import fcntl
import json
import pickle
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.cli.helpers import ForkingCli
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


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Iterator[ForkingCli]:
    runner = ForkingCli(tmp_path_factory.mktemp("cli-output"))
    yield runner
    runner.close()


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


def _output_dir_untouched(ws: Workspace) -> None:
    """The config was refused before the run began: output_dir was not even created (nor data or model loaded)."""
    assert not ws.output_dir.exists(), list(ws.output_dir.iterdir())


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


def _still_lora_config(path: Path) -> None:
    assert json.loads(path.read_text(encoding="utf-8"))["peft_type"] == "LORA"


def _set_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


# Helpers of the adapter, model and tokenizer rows: each prepares a workspace file while the command line is built.
_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('code ran')\n"


def _marker(ws: Workspace) -> Path:
    """The file that code shipped in a folder would create, had ranktune run it."""
    return ws.root / "code-ran"


def _no_code_ran(ws: Workspace) -> None:
    assert not _marker(ws).exists(), "code from a folder ran"


class _CodeOnUnpickle:
    """Pickles into a call of exec: loading the pickle runs code, as a hostile adapter_model.bin would."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return exec, (_CODE.format(marker=self.marker),)


def _causal(ws: Workspace) -> Path:
    """The causal adapter as PEFT saves it for a causal LM (task_type set), on this workspace's tiny llama."""
    _set_json(ws.causal_adapter / "adapter_config.json", task_type="CAUSAL_LM", base_model_name_or_path=str(ws.llama))
    return ws.causal_adapter


def _classifier(ws: Workspace, label_names: tuple[str, ...] = ("a", "b")) -> Path:
    """The classification adapter with its task_type and a ranktune.json naming its labels, on the tiny BERT."""
    folder = ws.classifier_adapter
    _set_json(folder / "adapter_config.json", task_type="SEQ_CLS", base_model_name_or_path=str(ws.bert))
    (folder / "ranktune.json").write_text(json.dumps({"label_names": list(label_names)}), encoding="utf-8")
    return folder


def _with_saved_head(folder: Path, rows: int) -> Path:
    """Adds a classification head of `rows` labels to the adapter's weights, as PEFT saves one for SEQ_CLS."""
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.classifier.weight"] = torch.zeros(rows, 32)  # (labels, hidden)
    tensors["base_model.model.classifier.bias"] = torch.zeros(rows)
    save_file(tensors, weights)
    return folder


def _tokenizer_code(ws: Workspace) -> Path:
    """The causal adapter made hostile: its ranktune.json asks for remote code, its tokenizer declares some."""
    folder = _causal(ws)
    (folder / "ranktune.json").write_text(json.dumps({"config": {"model": {"trust_remote_code": True}}}))
    _set_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    code = _CODE.format(marker=str(_marker(ws))) + "from transformers import PreTrainedTokenizerFast\n"
    code += "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    (folder / "tokenization_evil.py").write_text(code, encoding="utf-8")
    return folder


def _model_code(ws: Workspace) -> Path:
    """The tiny llama turned into a model whose classes are Python files in its folder (a hub repo's custom code)."""
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    _set_json(ws.llama / "config.json", model_type="evil-llama", auto_map=auto_map)
    for module in ("configuration_evil", "modeling_evil"):
        (ws.llama / f"{module}.py").write_text(_CODE.format(marker=str(_marker(ws))), encoding="utf-8")
    return ws.llama


def _add_model_code(ws: Workspace) -> list[str]:
    """`_model_code` while building a command line that names the adapter on it; adds no argument."""
    _model_code(ws)
    return []


def _base_moved(ws: Workspace) -> Path:
    """The causal adapter, its base model's folder no longer where adapter_config.json says."""
    folder = _causal(ws)
    _set_json(folder / "adapter_config.json", base_model_name_or_path=str(ws.root / "moved"))
    return folder


def _pickled(ws: Workspace) -> Path:
    """The causal adapter with its weights as a pickle that runs code when loaded, and no safetensors file."""
    folder = _causal(ws)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_CodeOnUnpickle(_marker(ws))))
    return folder


def _truncated(folder: Path) -> Path:
    """Cuts the last 100 bytes off the adapter's weights, as an interrupted copy would."""
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return folder


def _without_eos(ws: Workspace) -> Path:
    """The tiny llama with no EOS token in its tokenizer nor in its config."""
    tokenizer_config = ws.llama / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    data.pop("eos_token")
    tokenizer_config.write_text(json.dumps(data), encoding="utf-8")
    _set_json(ws.llama / "config.json", eos_token_id=None)
    return ws.llama


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
    Case("config path is a directory", lambda ws: ["train", str(ws.root)], 2, ("is a directory", "expected a config")),
    Case(
        "duplicate YAML key",
        lambda ws: ["train", ws.file("twice.yaml", Path(ws.config()).read_text() + "output_dir: elsewhere\n")],
        2,
        ("duplicate key 'output_dir'", "line 6", "first at line 5"),
    ),
    Case(
        "duplicate JSON key",
        lambda ws: ["train", ws.file("twice.json", '{"model": {"name_or_path": "m"}, "data": {}, "model": {}}')],
        2,
        ("malformed JSON", "duplicate key 'model'"),
    ),
    Case(
        "negative learning rate",
        lambda ws: ["train", ws.config(), "training.learning_rate=-1"],
        2,
        ("'training.learning_rate': must be >= 0 (got -1)",),
        after=_output_dir_untouched,
    ),
    Case(
        "batch size 0",
        lambda ws: ["train", ws.config(), "training.per_device_train_batch_size=0"],
        2,
        ("'training.per_device_train_batch_size': must be at least 1",),
        after=_output_dir_untouched,
    ),
    Case(
        "zero epochs",
        lambda ws: ["train", ws.config(), "training.max_steps=-1", "training.num_train_epochs=0"],
        2,
        ("'training.num_train_epochs': must be > 0", "untrained adapter"),
        after=_output_dir_untouched,
    ),
    Case(
        "max_steps 0",
        lambda ws: ["train", ws.config(), "training.max_steps=0"],
        2,
        ("'training.max_steps'", "-1 to train for num_train_epochs"),
        after=_output_dir_untouched,
    ),
    Case(
        "TrainingArguments refuses a value",
        lambda ws: ["train", ws.config(), "training.warmup_steps=-1"],
        2,
        ("invalid 'training' section", "warmup_steps"),
        after=_output_dir_untouched,
    ),
    Case(
        "FSDP1",
        lambda ws: ["train", ws.config(), "training.fsdp=true", "training.fsdp_config={fsdp_version: 1}"],
        2,
        ("fsdp_version 1 (FSDP1) is not supported", "fsdp_version: 2"),
        after=_output_dir_untouched,
    ),
    Case(
        "DeepSpeed with a method that edits the adapter during training",
        lambda ws: ["train", ws.config(), "training.deepspeed=ds_config.json", "allocation={method: l1ra}"],
        2,
        ("allocation.method 'l1ra' with DeepSpeed is not supported", "training.fsdp: true (FSDP2)", "eva"),
        after=_output_dir_untouched,
    ),
    Case(
        "FSDP loading the model on the meta device",
        lambda ws: [
            "train",
            ws.config(),
            "training.fsdp=true",
            "training.fsdp_config={cpu_ram_efficient_loading: true}",
        ],
        2,
        ("training.fsdp_config: FSDP: cpu_ram_efficient_loading", "set it to false"),
        after=_output_dir_untouched,
    ),
    Case(
        "trained bias under FSDP",
        lambda ws: ["train", ws.config(), "training.fsdp=true", "lora.bias=all"],
        2,
        ("lora.bias: 'all' with training.fsdp is not supported", "lora.bias: none"),
        after=_output_dir_untouched,
    ),
    Case(
        "FSDP in one process",
        lambda ws: ["train", ws.config(), "training.fsdp=true"],
        2,
        ("training.fsdp shards the model across processes", "torchrun --nproc_per_node N"),
        after=_output_dir_untouched,
    ),
    Case(
        "quantized base under FSDP",
        lambda ws: ["train", ws.config(), "training.fsdp=true", "model.quantization=4bit"],
        2,
        ("model.quantization: '4bit' with training.fsdp: a quantized base is not tested under FSDP2",),
        after=_output_dir_untouched,
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
    Case(
        "malformed JSON line",
        lambda ws: [
            "train",
            ws.config(train=ws.file("broken.jsonl", _classification_rows(40).replace('r 29"', 'r 29",'))),
        ],
        2,
        ("broken.jsonl as JSON: line 30, column",),
    ),
    *(
        Case(
            f"data file not UTF-8 ({kind})",
            lambda ws, kind=kind, text=text: [
                "train",
                ws.config(train=ws.file(f"latin1.{kind}", text.encode().replace(b"number 29", b"n\xe9mber 29"))),
            ],
            2,
            (f"latin1.{kind} is not UTF-8 text: line 30, column", "0xe9"),
        )
        for kind, text in (  # "example number 29" on line 30 of each file
            ("jsonl", _classification_rows(40)),
            ("json", "[" + _classification_rows(40).replace("}\n", "},\n")[:-2] + "]\n"),
            ("csv", "text,label\n" + "".join(f"example number {i},{'ab'[i % 2]}\n" for i in range(1, 40))),
            ("txt", "".join(f"example number {i}\n" for i in range(40))),
        )
    ),
    Case(
        "label names and ids mixed",
        lambda ws: [
            "train",
            ws.config(train=ws.file("mixed.jsonl", _classification_rows() + '{"text": "one more", "label": 1}\n')),
        ],
        2,
        ("label column 'label' mixes class names and class ids",),
    ),
    Case(
        "a single class",
        lambda ws: ["train", ws.config(train=ws.file("one.jsonl", _classification_rows().replace('"b"', '"a"')))],
        2,
        ("the train split has a single class", "'a'"),
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
    Case(
        "eval max samples with predictions",
        lambda ws: [
            "eval",
            str(ws.classifier_adapter),
            "--data",
            str(ws.train),
            "--max-samples",
            "2",
            "--predictions",
            str(ws.root / "p.jsonl"),
        ],
        2,
        ("--predictions", "--max-samples"),
    ),
    Case(
        "eval max samples 0",
        lambda ws: ["eval", str(ws.classifier_adapter), "--data", str(ws.train), "--max-samples", "0"],
        2,
        ("--max-samples",),
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
            ("export", lambda ws: ["--out", str(ws.root / "merged")]),
        )
    ),
    Case(
        "export into a folder that holds files",
        lambda ws: ["export", str(_causal(ws)), "--out", ws.file("taken/keep.txt", "mine").rsplit("/", 1)[0]],
        2,
        ("already exists", "--out"),
        after=lambda ws: _exists(ws.root / "taken" / "keep.txt"),
    ),
    Case(
        "export with --max-rank 0",
        lambda ws: ["export", str(_causal(ws)), "--out", str(ws.root / "capped"), "--max-rank", "0"],
        2,
        ("--max-rank must be at least 1",),
        after=lambda ws: _absent(ws.root / "capped"),
    ),
    Case(
        "export gguf of a classifier (a trained head)",
        lambda ws: [
            "export",
            str(_with_saved_head(_classifier(ws), 2)),
            "--out",
            str(ws.root / "a.gguf"),
            "--format",
            "gguf",
        ],
        2,
        ("llama.cpp adapter holds LoRA factors only",),
        after=lambda ws: _absent(ws.root / "a.gguf"),
    ),
    Case(
        "eval on an adapter whose tokenizer ships code",
        lambda ws: ["eval", str(_tokenizer_code(ws)), "--data", str(ws.train)],
        2,
        ("tokenizer_config.json", "auto_map", "--trust-remote-code"),
        after=_no_code_ran,
    ),
    Case(
        "generate with an adapter whose tokenizer ships code",
        lambda ws: ["generate", str(_tokenizer_code(ws)), "--prompt", "hi"],
        2,
        ("auto_map", "--trust-remote-code"),
        after=_no_code_ran,
    ),
    Case(
        "merge of an adapter whose tokenizer ships code",
        lambda ws: ["merge", str(_tokenizer_code(ws)), "--out", str(ws.root / "merged")],
        2,
        ("auto_map", "--trust-remote-code"),
        after=lambda ws: (_no_code_ran(ws), _absent(ws.root / "merged")),
    ),
    Case(
        "eval on an adapter whose base model ships code",
        lambda ws: ["eval", str(_causal(ws)), "--data", str(ws.train), *_add_model_code(ws)],
        2,
        ("the adapter's base model", "needs Python code of its own", "--trust-remote-code"),
        after=_no_code_ran,
    ),
    Case(
        "adapter with pickled weights only",
        lambda ws: ["eval", str(_pickled(ws)), "--data", str(ws.train)],
        2,
        ("adapter_model.bin", "pickle", "safetensors"),
        after=_no_code_ran,
    ),
    Case(
        "eval --predictions onto the --data file",
        lambda ws: ["eval", str(_classifier(ws)), "--data", str(ws.train), "--predictions", str(ws.train)],
        2,
        ("--predictions", "is the --data file"),
        after=lambda ws: _unchanged(ws.train, _classification_rows().encode()),
    ),
    Case(
        "eval --predictions onto a file of the adapter",
        lambda ws: [
            "eval",
            str(_classifier(ws)),
            "--data",
            str(ws.train),
            "--predictions",
            str(ws.classifier_adapter / "adapter_config.json"),
        ],
        2,
        ("--predictions", "a file of the adapter folder"),
        after=lambda ws: _still_lora_config(ws.classifier_adapter / "adapter_config.json"),
    ),
    *(
        Case(
            f"{verb} with truncated adapter weights",
            lambda ws, verb=verb, extra=extra: [verb, str(_truncated(_causal(ws))), *extra(ws)],
            2,
            ("adapter_model.safetensors", "damaged"),
            after=lambda ws: _absent(ws.root / "merged"),
        )
        for verb, extra in (
            ("eval", lambda ws: ["--data", str(ws.train)]),
            ("inspect", lambda ws: []),
            ("merge", lambda ws: ["--out", str(ws.root / "merged")]),
            ("generate", lambda ws: ["--prompt", "hi"]),
        )
    ),
    Case(
        "classifier with more labels than the base model's head",
        lambda ws: ["eval", str(_with_saved_head(_classifier(ws, ("a", "b", "c")), 3)), "--data", str(ws.train)],
        2,
        ("classification head for 2 labels", "3 labels are needed"),
    ),
    Case(
        "classifier adapter without its saved head",
        lambda ws: ["eval", str(_classifier(ws)), "--data", str(ws.train)],
        2,
        ("a classification adapter without a saved classification head", "adapter_model.safetensors"),
    ),
    Case(
        "classifier whose saved head has another label count",
        lambda ws: ["eval", str(_with_saved_head(_classifier(ws, ("a", "b", "c")), 2)), "--data", str(ws.train)],
        2,
        ("3 label names", "has 2 rows"),
    ),
    Case(
        "adapter whose base model is gone",
        lambda ws: ["generate", str(_base_moved(ws)), "--prompt", "hi"],
        2,
        ("the adapter's base model", "moved' (base_model_name_or_path in", "cannot be found"),
    ),
    Case(
        "inspect --plot below a file",
        lambda ws: ["inspect", str(ws.causal_adapter), "--plot", str(Path(ws.file("a-file", "")) / "plots" / "r.png")],
        2,
        ("--plot", "is a file"),
    ),
    Case(
        "generate with a negative temperature",
        lambda ws: ["generate", str(_causal(ws)), "--prompt", "hi", "--temperature", "-1"],
        2,
        ("--temperature", "-1.0"),
    ),
    # --- models and tokenizers ---
    Case(
        "causal LM whose tokenizer has no EOS token",
        lambda ws: ["train", ws.config(model=_without_eos(ws)), "model.task=causal_lm"],
        2,
        ("has no EOS token", '"eos_token"', "tokenizer_config.json"),
        after=_nothing_in_output_dir,
    ),
    Case(
        "train on a local model that ships code",
        lambda ws: ["train", ws.config(model=_model_code(ws)), "model.task=causal_lm"],
        2,
        ("needs Python code of its own", "model.trust_remote_code: true"),
        after=_no_code_ran,
    ),
    Case(
        "rank_pattern key matching no module",
        lambda ws: ["train", ws.config(), "lora.rank_pattern.qeury=8"],
        2,
        ("lora.rank_pattern", "'qeury' matches no adapted module", "query"),
        after=_nothing_in_output_dir,
    ),
    Case(
        "alpha_pattern key matching no module",
        lambda ws: ["train", ws.config(), "lora.alpha_pattern.valeu=8"],
        2,
        ("lora.alpha_pattern", "'valeu'", "value"),
        after=_nothing_in_output_dir,
    ),
]


def _is_progress_bar(line: str) -> bool:
    """A tqdm line (loading weights, mapping a dataset): progress, not noise."""
    return "%|" in line and ("it/s" in line or "s/it" in line)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input(case: Case, workspace: Workspace, cli: ForkingCli) -> None:
    result: subprocess.CompletedProcess = cli.run(*case.argv(workspace), cwd=workspace.root)
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
