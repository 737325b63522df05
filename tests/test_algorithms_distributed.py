"""Global statistics across 2 gloo processes equal the statistics of the concatenated batch.

Each rank holds a different-sized slice (different B, T and masks) of one rollout batch; the
all-reduced whitening and advantages must match a single process working on the whole batch.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from two_ranks import run_on_two_ranks

from rpp_lightning.algorithms import RunningMeanStd, compute_advantages, masked_whiten

KL_COEF = 0.05
MASKS = [
    # rank 0: B=3, T=5 — full row, tool token inside, all-masked row
    torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]]),
    # rank 1: B=5, T=4 — one-token row, shorter rows, masked token inside
    torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 0, 0]]),
]


def _parts() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    parts = []
    for mask in MASKS:
        B, T = mask.shape
        parts.append(
            {
                "x": torch.randn(B, T, generator=gen) * 3.0 + 2.0,
                "mask": mask,
                "rewards": torch.randn(B, generator=gen),
                "kl": torch.randn(B, T, generator=gen) * 0.1,
            }
        )
    return parts


def _pad(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.size(1)), value=value)


def _concatenated(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(p["mask"].size(1) for p in parts)
    # Padding values are garbage on purpose: the mask must keep them out of every statistic.
    return {
        "x": torch.cat([_pad(p["x"], width, 1e6) for p in parts]),
        "mask": torch.cat([_pad(p["mask"], width, 0) for p in parts]),
        "rewards": torch.cat([p["rewards"] for p in parts]),
        "kl": torch.cat([_pad(p["kl"], width, 1e6) for p in parts]),
    }


def _advantages(batch: dict[str, torch.Tensor], group=None):
    """REINFORCE++ advantages of `batch`, whitened over `group` (all ranks) or this batch."""
    return compute_advantages(
        "reinforce_pp",
        batch["rewards"],
        batch["kl"],
        batch["mask"],
        n_samples_per_prompt=1,
        kl_coef=KL_COEF,
        group=group,
    )


def _worker(rank: int, parts: list, out_dir: str) -> None:
    p, world = parts[rank], dist.group.WORLD
    whitened = masked_whiten(p["x"], p["mask"], group=world)
    out = _advantages(p, group=world)
    rms = RunningMeanStd()
    rms.update(p["rewards"], group=world)
    result = {
        "whitened": whitened,
        "advantages": out.advantages,
        "returns": out.returns,
        "stats": out.stats,
        "rms": rms.state_dict(),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.timeout(120)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_global_whitening_and_advantages_match_concatenated_batch(tmp_path: Path):
    parts = _parts()
    run_on_two_ranks(_worker, parts, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    full = _concatenated(parts)
    ref_whitened = masked_whiten(full["x"], full["mask"])
    ref = _advantages(full)
    rows = [slice(0, 3), slice(3, 8)]
    for part, res, row in zip(parts, results, rows, strict=True):
        width = part["mask"].size(1)
        for key, expected in [
            ("whitened", ref_whitened),
            ("advantages", ref.advantages),
            ("returns", ref.returns),
        ]:
            torch.testing.assert_close(res[key], expected[row, :width], atol=1e-6, rtol=0)
            assert (expected[row, width:] == 0).all()
        assert res["stats"] == pytest.approx(ref.stats, abs=1e-6)

    # Teeth: per-rank whitening without the all-reduce really differs from the global one.
    local = masked_whiten(parts[0]["x"], parts[0]["mask"])
    assert not torch.allclose(local, ref_whitened[0:3], atol=1e-3)

    # Running reward statistics merged across ranks equal those of all 8 rewards.
    rewards = full["rewards"].double()
    for res in results:
        assert res["rms"]["count"] == 8
        assert res["rms"]["mean"] == pytest.approx(rewards.mean().item(), abs=1e-9)
        assert res["rms"]["var"] == pytest.approx(rewards.var(unbiased=False).item(), abs=1e-9)
