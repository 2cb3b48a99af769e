"""Plan validation before anything is written: empty plans, duplicate ids, unknown
dependencies and cycles (named, in order) are refused; any DAG gets a dependency order."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hive_orchestration import InvalidInputError
from hive_orchestration.api.ops.plan_graph import check_plan_graph


def test_a_diamond_is_ordered_by_its_dependencies() -> None:
    ids = ["deploy", "test", "build", "lint"]
    deps = [["test", "lint"], ["build"], [], ["build"]]
    order = [ids[i] for i in check_plan_graph(ids, deps)]
    assert order == ["build", "test", "lint", "deploy"]


def test_an_empty_plan_is_refused() -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_plan_graph([], [])
    assert caught.value.field == "subtasks"


def test_a_duplicate_id_is_named() -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_plan_graph(["a", "b", "a"], [[], [], []])
    assert caught.value.field == "subtasks[2].id"
    assert "subtasks[0]" in caught.value.reason


def test_an_unknown_dependency_is_named() -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_plan_graph(["a", "b"], [[], ["a", "ghost"]])
    assert caught.value.field == "subtasks[1].dependencies[1]"
    assert "'ghost'" in caught.value.reason


@pytest.mark.parametrize(
    ("ids", "deps", "cycle"),
    [
        (["a"], [["a"]], "'a' -> 'a'"),
        (["a", "b"], [["b"], ["a"]], "'a' -> 'b' -> 'a'"),
        # x feeds a cycle of three; the cycle alone is named, in the order work flows.
        (["x", "a", "b", "c"], [[], ["c", "x"], ["a"], ["b"]], "'a' -> 'b' -> 'c' -> 'a'"),
    ],
)
def test_a_cycle_is_named_in_order(ids: list[str], deps: list[list[str]], cycle: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_plan_graph(ids, deps)
    assert caught.value.field == "subtasks"
    assert caught.value.reason == f"dependency cycle: {cycle}"


def test_a_long_chain_is_fine() -> None:
    n = 100_000
    ids = [f"s{i}" for i in range(n)]
    deps = [[] if i == 0 else [f"s{i - 1}"] for i in range(n)]
    assert check_plan_graph(ids, deps) == list(range(n))
    deps[0] = [f"s{n - 1}"]  # close it into one 100 000-long cycle
    with pytest.raises(InvalidInputError, match="dependency cycle"):
        check_plan_graph(ids, deps)


def test_a_repeated_dependency_counts_once() -> None:
    assert check_plan_graph(["a", "b"], [[], ["a", "a"]]) == [0, 1]


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    n = draw(st.integers(1, 30))
    ids = [f"t{i}" for i in draw(st.permutations(range(n)))]
    deps = [
        [ids[j] for j in draw(st.lists(st.integers(0, i - 1), max_size=4))] if i else []
        for i in range(n)
    ]
    shuffle = draw(st.permutations(range(n)))
    return [ids[i] for i in shuffle], [deps[i] for i in shuffle]


@settings(max_examples=200, deadline=None)
@given(dags())
def test_every_dag_gets_an_order_that_respects_it(plan: tuple[list[str], list[list[str]]]) -> None:
    ids, deps = plan
    order = check_plan_graph(ids, deps)
    assert sorted(order) == list(range(len(ids)))
    position = {ids[i]: p for p, i in enumerate(order)}
    for i, needs in enumerate(deps):
        for need in needs:
            assert position[need] < position[ids[i]]


@settings(max_examples=200, deadline=None)
@given(dags(), st.data())
def test_a_back_edge_makes_a_named_cycle(
    plan: tuple[list[str], list[list[str]]], data: st.DataObject
) -> None:
    ids, deps = plan
    edges = [(i, need) for i, needs in enumerate(deps) for need in needs]
    if not edges:
        return
    i, need = data.draw(st.sampled_from(edges))
    # need -> ... -> ids[i]: making `need` depend on ids[i] closes a cycle.
    deps = [list(d) for d in deps]
    deps[ids.index(need)].append(ids[i])
    with pytest.raises(InvalidInputError) as caught:
        check_plan_graph(ids, deps)
    named = caught.value.reason.removeprefix("dependency cycle: ").split(" -> ")
    cycle = [name.strip("'") for name in named]
    assert cycle[0] == cycle[-1]
    # Every step of the named cycle is a real dependency, in the order work flows.
    for before, after in itertools.pairwise(cycle):
        assert before in deps[ids.index(after)]
