"""The public surface: every name in ``__all__`` exists, is exported once, and is documented."""

from __future__ import annotations

import hive_orchestration


def test_every_public_name_is_exported_once() -> None:
    names = hive_orchestration.__all__
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(hive_orchestration, name), name


def test_public_classes_and_functions_have_docstrings() -> None:
    for name in hive_orchestration.__all__:
        value = getattr(hive_orchestration, name)
        if isinstance(value, type) or callable(value):
            assert value.__doc__, f"{name} has no docstring"


def test_no_private_module_leaks_into_the_namespace() -> None:
    public = set(hive_orchestration.__all__)
    leaked = {
        name
        for name in vars(hive_orchestration)
        if not name.startswith("_") and name not in public and not _is_submodule(name)
    }
    assert leaked == set()


def _is_submodule(name: str) -> bool:
    value = getattr(hive_orchestration, name)
    return getattr(value, "__name__", "").startswith("hive_orchestration.")
