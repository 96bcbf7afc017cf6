"""Each module's ``__all__`` names exactly the public classes and functions it defines."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from support import PACKAGES

MODULES = sorted(
    name
    for package in map(importlib.import_module, PACKAGES)
    for _, name, _ in pkgutil.iter_modules(package.__path__, prefix=f"{package.__name__}.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_all_matches_the_public_definitions(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(getattr(module, "__all__", ()))
    assert exported, f"{name} has no __all__"
    assert all(hasattr(module, attr) for attr in exported), f"{name}.__all__ names something missing"
    defined = {
        attr
        for attr, obj in vars(module).items()
        if not attr.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == name
    }
    assert defined <= exported, f"{name} defines public {sorted(defined - exported)} missing from __all__"
