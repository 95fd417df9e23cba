"""docs/benchmarks.md: each script rewrites its own section and leaves the others as they were."""

from __future__ import annotations

import pytest

from benchmarks.common import update_section


def test_each_section_is_replaced_alone_and_kept_in_order(tmp_path):
    doc = tmp_path / "benchmarks.md"
    update_section("throughput", "## Throughput\n\nfirst", doc)
    update_section("overhead", "## Overhead\n\ntable one", doc)
    update_section("throughput", "## Throughput\n\nsecond", doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "table one" in text and "second" in text and "first" not in text
    assert text.index("## Overhead") < text.index("## Throughput")
    update_section("overhead", "## Overhead\n\ntable two", doc)
    text = doc.read_text()
    assert "table two" in text and "table one" not in text and "second" in text
    assert text.count("<!-- begin overhead -->") == text.count("<!-- end throughput -->") == 1


def test_an_unknown_section_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown section 'speed'"):
        update_section("speed", "x", tmp_path / "benchmarks.md")
