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


def test_the_moved_modules_old_paths_give_the_same_objects() -> None:
    # The API's modules moved under hive_orchestration/api/; the paths users may have
    # imported from (and the docs named) re-export the very same objects.
    from hive_orchestration import client, embedded, sync, wire
    from hive_orchestration.api import client as new_client
    from hive_orchestration.api import embedded as new_embedded
    from hive_orchestration.api import sync as new_sync
    from hive_orchestration.api import wire as new_wire

    for old, new in [
        (client, new_client),
        (embedded, new_embedded),
        (sync, new_sync),
        (wire, new_wire),
    ]:
        assert old.__all__ == new.__all__
        for name in new.__all__:
            assert getattr(old, name) is getattr(new, name), f"{old.__name__}.{name}"
