"""Module names from before the package had layers (0.1), still importable.

YAML files name classes by module path (`rpp_lightning.plots.TrainingCurves`), checkpoints pickle
their hyperparameters by module path (`rpp_lightning.replicas.FailurePolicy`) and scripts import
`rpp_lightning.generation.client`. Those names keep working: importing one gives a module whose
names are the new module's (the same classes and functions, so `isinstance` and pickling agree).
New code uses the new paths; nothing in the package imports an old one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MOVED = {
    "rpp_lightning.behaviour": "rpp_lightning.rl.behaviour",
    "rpp_lightning.channels": "rpp_lightning.rpc.channels",
    "rpp_lightning.checkpoints": "rpp_lightning.trainer.checkpoints",
    "rpp_lightning.critic": "rpp_lightning.rl.critic",
    "rpp_lightning.data": "rpp_lightning.trainer.data",
    "rpp_lightning.evaluation": "rpp_lightning.rl.evaluation",
    "rpp_lightning.experience": "rpp_lightning.rl.experience",
    "rpp_lightning.experience_maker": "rpp_lightning.rl.experience_maker",
    "rpp_lightning.faults": "rpp_lightning.rl.faults",
    "rpp_lightning.generation.client": "rpp_lightning.clients.generation",
    "rpp_lightning.generation.seeds": "rpp_lightning.rpc.seeds",
    "rpp_lightning.generation.weights": "rpp_lightning.weight_transport.wire",
    "rpp_lightning.local_servers": "rpp_lightning.clients.local_servers",
    "rpp_lightning.metrics": "rpp_lightning.rl.metrics",
    "rpp_lightning.models": "rpp_lightning.rl.models",
    "rpp_lightning.module": "rpp_lightning.trainer.module",
    "rpp_lightning.pipeline": "rpp_lightning.rl.pipeline",
    "rpp_lightning.plots": "rpp_lightning.trainer.plots",
    "rpp_lightning.policy": "rpp_lightning.rl.policy",
    "rpp_lightning.progress": "rpp_lightning.trainer.progress",
    "rpp_lightning.replicas": "rpp_lightning.rpc.replicas",
    "rpp_lightning.rewards": "rpp_lightning.clients.rewards",
    "rpp_lightning.rollout_source": "rpp_lightning.rl.rollout_source",
    "rpp_lightning.server_config": "rpp_lightning.rpc.server_config",
    "rpp_lightning.servers": "rpp_lightning.rl.trainer_servers",
    "rpp_lightning.serving": "rpp_lightning.rpc.serving",
    "rpp_lightning.strategy": "rpp_lightning.trainer.strategy",
    "rpp_lightning.timing": "rpp_lightning.rl.timing",
    "rpp_lightning.update": "rpp_lightning.rl.update",
    "rpp_lightning.weight_sync": "rpp_lightning.rl.weight_sync",
}
"""Old module name → where its code lives now."""


class _OldName(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # a fresh module, filled below

    def exec_module(self, module: ModuleType) -> None:
        new = importlib.import_module(MOVED[module.__name__])
        names = {k: v for k, v in vars(new).items() if not k.startswith("__")}
        module.__dict__.update(names, __doc__=f"Moved to {new.__name__}.")


def install() -> None:
    """Let the old names import (idempotent); called when the package is imported."""
    if not any(isinstance(finder, _OldName) for finder in sys.meta_path):
        sys.meta_path.append(_OldName())
