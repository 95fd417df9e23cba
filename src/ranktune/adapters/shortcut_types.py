"""The kinds of HeteroLoRA's shortcut connections and the resolved settings of one connection (no torch)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

ShortcutKind = Literal["residual1", "residual2", "shortcut1", "shortcut2"]
SHORTCUT_KINDS: tuple[str, ...] = typing.get_args(ShortcutKind)


@dataclass(frozen=True)
class ShortcutSpec:
    """The resolved hyper-parameters of one enabled shortcut connection (scale alpha / r)."""

    r: int
    alpha: float
    dropout: float


def is_shortcut(name: str) -> bool:
    """Whether a candidate's name is a shortcut connection's (`model.layers.3.residual1`)."""
    return name.rsplit(".", 1)[-1] in SHORTCUT_KINDS
