"""Cross-rank parts of the update on 2 gloo processes: the equal-work check, metric reduction."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from two_ranks import run_on_two_ranks

from rpp_lightning.metrics import reduce_metrics
from rpp_lightning.update import check_same_rows_on_every_rank


def _worker(rank: int, out_dir: str) -> None:
    group, device = dist.group.WORLD, torch.device("cpu")
    result = {}
    check_same_rows_on_every_rank(8, group, device)  # equal: passes on both ranks
    try:
        check_same_rows_on_every_rank(8 if rank == 0 else 6, group, device)
        result["unequal"] = "passed"
    except RuntimeError as exc:
        result["unequal"] = str(exc)
    # accuracy undefined on rank 1 (no verifier verdicts), a per-source reward on both
    metrics = {
        "reward": [0.5, 1.5][rank],
        "accuracy": [0.25, None][rank],
        "response_length/max": [7.0, 12.0][rank],
        "reward/chat": None,
    }
    result["reduced"] = reduce_metrics(metrics, group, device)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.mark.timeout(120)
def test_unequal_work_is_refused_and_metrics_reduce_over_ranks(tmp_path) -> None:
    run_on_two_ranks(_worker, str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "different rollout batch sizes (max 8, min 6" in result["unequal"]
        # means over the ranks where a metric is defined, maxima for /max, undefined dropped
        assert result["reduced"] == {
            "reward": 1.0,
            "accuracy": 0.25,
            "response_length/max": 12.0,
        }
