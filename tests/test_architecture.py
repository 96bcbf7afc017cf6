"""docs/architecture.md describes the tree as it is: its layer table names every module of every
package, and nothing that is not there; the command table names real modules."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest
from support import PACKAGES, REPO

DOC = (REPO / "docs" / "architecture.md").read_text()


def _layer_rows() -> dict[str, set[str]]:
    rows: dict[str, set[str]] = {}
    for line in DOC.splitlines():
        match = re.match(r"\| `(\w+)` \|[^|]*\|(.*)\|\s*$", line)
        if match and match.group(1) in PACKAGES:
            rows[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    return rows


@pytest.mark.parametrize("package", PACKAGES)
def test_the_layer_table_names_every_module_of_each_package(package: str) -> None:
    modules = {
        name
        for _, name, _ in pkgutil.iter_modules(importlib.import_module(package).__path__)
        if name != "__main__"
    }
    assert _layer_rows()[package] == modules


def test_every_module_the_command_table_points_to_exists() -> None:
    table = DOC[DOC.index("## From a command to its code") :]
    named = set(re.findall(r"`((?:\w+)\.(?:\w+))`", table))
    assert named
    for name in named:
        importlib.import_module(name)
