"""Loading data files and hub names, and the train/validation/test splits."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset

from ranktune.config import DataConfig
from ranktune.data import load_file, load_splits, sources
from ranktune.errors import UserInputError

ROWS = [{"text": f"example {i}", "label": i % 2} for i in range(20)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_table_format_loads_the_same_rows(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)

    dataset = load_file(str(path))

    assert dataset.to_list() == ROWS


def test_txt_gives_one_row_per_line_in_column_text(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\nthird\n", encoding="utf-8")

    dataset = load_file(str(path))

    assert dataset.column_names == ["text"]
    assert dataset["text"] == ["first line", "second line", "third"]


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(UserInputError, match="not found") as error:
        load_file(str(path))
    assert str(path) in str(error.value)


def test_unsupported_extension_names_file_and_expected_types(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("whatever", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"unsupported data file type '\.xlsx'") as error:
        load_file(str(path))
    assert str(path) in str(error.value)
    assert "json/jsonl/csv/parquet/txt" in str(error.value)


@pytest.mark.parametrize("content", ["", "a,b\n"], ids=["zero-bytes", "csv-header-only"])
def test_empty_file_is_an_error_naming_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_file(str(path))
    assert str(path) in str(error.value)


def test_malformed_file_reports_the_parser_problem(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"cannot read .*broken.jsonl as JSON"):
        load_file(str(path))


def numbered_jsonl(count: int, broken: dict[int, str]) -> str:
    """`count` JSON lines, where line n (counted from 1) is `broken[n]` instead of a valid object."""
    return "".join(
        broken.get(n, json.dumps({"text": f"example {n}", "label": n % 2})) + "\n" for n in range(1, count + 1)
    )


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", numbered_jsonl(40, {30: '{"text": "x", "label": a}'}), "line 30, column 24: Expecting value"),
        # pyarrow counts rows from 0 within each block of ~320 kB: its row number matches no line this far down
        ("far.jsonl", numbered_jsonl(30_000, {25_000: '{"text": "x",'}), "line 25000, column 14: Expecting"),
        ("array.jsonl", numbered_jsonl(3, {2: "[1, 2]"}), "line 2: expected one JSON object per line, got list"),
        (
            "pretty.json",
            '[\n  {"text": "a", "label": 0},\n  {"text": "b" "label": 1}\n]\n',
            "line 3, column 16: Expecting ',' delimiter",
        ),
    ],
    ids=["line-30", "beyond-the-first-block", "not-an-object", "one-document"],
)
def test_malformed_json_names_the_line_counted_from_1(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_file(str(path))
    assert f"cannot read {path} as JSON: {expected}" in str(error.value)
    assert "row" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "lines", "line"),
    [
        ("data.jsonl", [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(40)], 30),
        ("data.json", ["["] + [json.dumps({"text": f"t{i}", "label": i % 2}) + "," for i in range(39)] + ["{}]"], 30),
        ("data.csv", ["text,label"] + [f"t{i},{i % 2}" for i in range(40)], 30),
        ("data.txt", [f"sentence number {i}" for i in range(40)], 30),
        ("long.txt", [f"sentence number {i:06d} of a file above one read block" for i in range(40_000)], 35_000),
    ],
    ids=["jsonl", "json", "csv", "txt", "txt-beyond-the-first-block"],
)
def test_a_byte_that_is_not_utf8_names_file_line_and_column(tmp_path: Path, name: str, lines: list, line: int) -> None:
    """A Latin-1 'é' after the first two characters of the line; JSON lines would otherwise load without complaint."""
    encoded = [text.encode("utf-8") for text in lines]
    encoded[line - 1] = encoded[line - 1][:2] + "é".encode("latin-1") + encoded[line - 1][2:]
    path = tmp_path / name
    path.write_bytes(b"\n".join(encoded) + b"\n")
    with pytest.raises(UserInputError) as error:
        load_file(str(path))
    assert f"data file {path} is not UTF-8 text: line {line}, column 3 holds the byte 0xe9" in str(error.value)


def test_utf8_with_a_byte_order_mark_and_multibyte_characters_loads(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\ncafé ☕,1\nnaïve,0\n".encode("utf-8-sig"))
    assert load_file(str(path))["text"] == ["café ☕", "naïve"]


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="is a directory"):
        load_file(str(tmp_path))


def test_name_without_extension_goes_to_the_hub_with_subset_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(path: str, name: str | None = None, **kwargs) -> Dataset:
        calls.append((path, name, kwargs))
        return Dataset.from_dict({"text": ["a"]})

    monkeypatch.setattr(sources, "load_dataset", fake_load_dataset)

    dataset = load_file("someone/some-dataset", "sst2", split="validation")

    assert calls == [("someone/some-dataset", "sst2", {"split": "validation"})]
    assert dataset["text"] == ["a"]


def test_unreachable_hub_dataset_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs) -> Dataset:
        raise ConnectionError("Couldn't reach 'someone/some-dataset' on the Hub")

    monkeypatch.setattr(sources, "load_dataset", offline)

    with pytest.raises(UserInputError, match=r"cannot load data 'someone/some-dataset'.*Couldn't reach"):
        load_file("someone/some-dataset")


def config_for(tmp_path: Path, **overrides) -> DataConfig:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return DataConfig(train=str(train), **overrides)


def test_seeded_validation_split_is_disjoint_sized_and_reproducible(tmp_path: Path) -> None:
    config = config_for(tmp_path, validation_split=0.25, seed=3)

    first, second = load_splits(config), load_splits(config)

    assert set(first) == {"train", "validation"}
    assert (len(first["train"]), len(first["validation"])) == (15, 5)
    train_texts, validation_texts = set(first["train"]["text"]), set(first["validation"]["text"])
    assert not train_texts & validation_texts
    assert train_texts | validation_texts == {row["text"] for row in ROWS}
    assert first["validation"]["text"] == second["validation"]["text"]
    assert first["train"]["text"] == second["train"]["text"]


def test_other_seed_gives_another_validation_split(tmp_path: Path) -> None:
    one = load_splits(config_for(tmp_path, validation_split=0.25, seed=1))
    two = load_splits(config_for(tmp_path, validation_split=0.25, seed=2))
    assert set(one["validation"]["text"]) != set(two["validation"]["text"])


def test_given_validation_and_test_files_are_used(tmp_path: Path) -> None:
    validation = write_jsonl(tmp_path / "dev.jsonl", ROWS[:3])
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[3:7])
    config = config_for(tmp_path, validation=str(validation), test=str(test))

    splits = load_splits(config)

    assert len(splits["train"]) == len(ROWS)
    assert splits["validation"].to_list() == ROWS[:3]
    assert splits["test"].to_list() == ROWS[3:7]


def test_max_samples_keep_a_seeded_subset(tmp_path: Path) -> None:
    test = write_jsonl(tmp_path / "test.jsonl", ROWS)
    config = config_for(
        tmp_path, test=str(test), max_train_samples=4, max_eval_samples=2, max_test_samples=3, validation_split=0.5
    )

    splits = load_splits(config)
    again = load_splits(config)

    assert [len(splits[name]) for name in ("train", "validation", "test")] == [4, 2, 3]
    assert splits["train"]["text"] == again["train"]["text"]
    full = load_splits(config.model_copy(update={"max_train_samples": None}))
    assert set(splits["train"]["text"]) <= set(full["train"]["text"])
    assert splits["test"]["text"] != [row["text"] for row in ROWS[:2]], "a random subset, not the first rows"


def test_max_samples_above_size_keeps_everything(tmp_path: Path) -> None:
    splits = load_splits(config_for(tmp_path, max_train_samples=1000, validation_split=0.5))
    assert len(splits["train"]) == 10


def test_single_row_cannot_be_split(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "one.jsonl", ROWS[:1])
    with pytest.raises(UserInputError, match="too few to split off a validation set"):
        load_splits(DataConfig(train=str(train)))
