"""FSDP2 for Lightning: `ModelParallelStrategy` with every process in the data-parallel dimension.

Lightning's `ModelParallelStrategy` defaults to tensor parallelism inside a node; REINFORCE++
here shards with FSDP2 only, so all processes form one data-parallel mesh dimension and
`configure_model` applies `fully_shard` over it. Unlike `strategy="fsdp"`, this also runs on CPU
with gloo (how the tests exercise the sharded path).

    rpp-train fit --config configs/tiny.yaml --trainer.devices 2 --trainer.strategy fsdp2

`rpp-train` reads `--trainer.strategy fsdp` (the word people type) as `fsdp2`: `rpp_strategy`.
Lightning's registry entry `fsdp` is left as it is (its FSDP1 strategy), so `Trainer(strategy=
"fsdp")` in a user's own script still means what Lightning's documentation says.
"""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Data-parallel FSDP2 over all processes (tensor-parallel size 1)."""

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout_s: float = 1800.0,
    ) -> None:
        """
        Args:
            save_distributed_checkpoint: write sharded checkpoints (a directory) rather than
                gathering a full one on rank 0.
            process_group_backend: "nccl" or "gloo"; default: nccl on CUDA, gloo on CPU.
            timeout_s: collective timeout; a rank stuck longer than this fails the run.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout_s),
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def rpp_strategy(strategy: object) -> object:
    """The strategy `rpp-train` runs for the one typed: "fsdp" becomes "fsdp2"; anything else is
    kept, except Lightning's other FSDP1 names, refused (ValueError naming fsdp2)."""
    if not isinstance(strategy, str):
        return strategy
    name = strategy.lower()  # as Lightning reads it
    if name == "fsdp":
        return "fsdp2"
    from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

    if name in StrategyRegistry and issubclass(StrategyRegistry[name]["strategy"], FSDPStrategy):
        # FSDP1 wraps the model itself: this trainer shards with fully_shard (FSDP2) only
        raise ValueError(
            f"--trainer.strategy {strategy} is Lightning's FSDP1, which rpp-train does not run; "
            "use --trainer.strategy fsdp2 (FSDP2, CPU or CUDA)"
        )
    return strategy


def register() -> None:
    """Make `--trainer.strategy fsdp2` mean FSDP2Strategy (idempotent)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register(
            "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) data parallel, CPU or CUDA"
        )
