"""The package's import graph: no circle, and a bounded depth from the CLI down.

`lint-imports` (CI, the contracts in pyproject.toml) says which layer may import which; this
test reads the same graph (grimp, import-linter's library) for what contracts cannot state.
"""

from __future__ import annotations

import functools

import pytest

MAX_DEPTH = 8
"""Longest chain of imports from `rpp_lightning.cli` down to a module that imports no other of
the package's modules (12 before the trainer was split into parts)."""


def _graph(runtime_only: bool = True):
    """The package's import graph; `runtime_only`: without imports under `if TYPE_CHECKING:`,
    which only name a type for annotations."""
    # a dev dependency (import-linter's): imported here so that collecting this file on a
    # machine without it (the GPU check's) skips nothing it did not select
    grimp = pytest.importorskip("grimp")
    return grimp.build_graph(
        "rpp_lightning", "reward_servers", exclude_type_checking_imports=runtime_only,
        cache_dir=None,
    )  # fmt: skip


def _modules(graph) -> set[str]:
    return {m for m in graph.modules if m.startswith(("rpp_lightning", "reward_servers"))}


def test_no_import_circle() -> None:
    graph = _graph(runtime_only=False)  # not even through an annotation
    modules = _modules(graph)
    circles = []
    for module in sorted(modules):
        for imported in graph.find_modules_directly_imported_by(module) & modules:
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                circles.append((module, *back))
    assert circles == [], f"import circles: {circles[:5]}"


def longest_chain(graph, start: str) -> list[str]:
    """The longest chain of package imports from `start` (the graph has no circle)."""
    modules = _modules(graph)

    @functools.cache
    def down(module: str) -> tuple[str, ...]:
        below = graph.find_modules_directly_imported_by(module) & modules
        return (module, *max((down(m) for m in below), key=len, default=()))

    return list(down(start))


def test_import_depth_from_the_cli_is_bounded() -> None:
    chain = longest_chain(_graph(), "rpp_lightning.cli")
    assert len(chain) - 1 <= MAX_DEPTH, " -> ".join(chain)


def test_the_module_names_of_0_1_still_import_to_the_same_objects() -> None:
    """YAML class paths, pickled checkpoint classes and scripts name modules by their 0.1 path."""
    import importlib
    import pickle

    from rpp_lightning._moved import MOVED

    for old, new in MOVED.items():
        old_module, new_module = importlib.import_module(old), importlib.import_module(new)
        shared = [n for n in vars(new_module) if not n.startswith("__")]
        assert shared and all(getattr(old_module, n) is getattr(new_module, n) for n in shared)
    from rpp_lightning.rpc.failures import FailurePolicy

    # a checkpoint of 0.1 pickled this class under its old module name
    old_pickle = pickle.dumps(FailurePolicy(retry_budget_s=7.0), protocol=0).replace(
        b"rpp_lightning.rpc.failures", b"rpp_lightning.replicas"
    )
    assert b"rpp_lightning.replicas" in old_pickle
    assert pickle.loads(old_pickle) == FailurePolicy(retry_budget_s=7.0)


def test_a_yaml_file_naming_the_classes_by_their_0_1_paths_still_configures_a_run(tmp_path) -> None:
    from conftest import ROOT

    from rpp_lightning.cli import cli_main
    from rpp_lightning.trainer.checkpoints import IterationCheckpoint
    from rpp_lightning.trainer.plots import TrainingCurves

    config = tmp_path / "old.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: rpp_lightning.plots.TrainingCurves\n"
        "    - class_path: rpp_lightning.checkpoints.IterationCheckpoint\n"
        "      init_args: {every_n_iterations: 2}\n"
    )
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(config)]
    cli = cli_main(args, run=False)
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {TrainingCurves, IterationCheckpoint} <= kinds
