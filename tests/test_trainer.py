"""The trainer end to end: `rpp-train fit` against real generation and reward servers.

Each run is a real `python -m rpp_lightning.cli fit --config configs/tiny.yaml ...` process with
a tiny Llama, a real transformers generation server and a real reward server (a user verifier
with graded rewards, so updates are not all zero), talking gRPC on loopback ports.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ROOT, free_port, python_module, wait_for
from safetensors.torch import load_file

from rpp_lightning.proto import generation_pb2, generation_pb2_grpc

TINY = str(ROOT / "configs" / "tiny.yaml")
DATA = ROOT / "data" / "arithmetic"
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

pytestmark = pytest.mark.slow


def fit_args(*overrides: str) -> list[str]:
    """`fit` on configs/tiny.yaml with the committed arithmetic prompts, then `overrides`."""
    return [
        "fit", "--config", TINY,
        "--data.train_path", str(DATA / "train.jsonl"),
        "--data.val_path", str(DATA / "val.jsonl"),
        *overrides,
    ]  # fmt: skip


def run_ok(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a trainer command to its end; fail the test with its output unless it succeeded."""
    result = subprocess.run(
        argv, cwd=cwd, env={**os.environ, **ENV, **env}, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def launcher_argv(launcher: str | None, devices: int) -> list[str]:
    """How `rpp-train` is started: Lightning launches the ranks itself (None), or Lightning's
    `fabric run` starts them and the trainer joins them (`torchrun`: train_on_two_nodes)."""
    port = str(free_port())  # not the default 29500, which another run may hold
    return {
        None: [sys.executable, "-m", "rpp_lightning.cli"],
        "fabric-run": ["fabric", "run", "--accelerator", "cpu", "--devices", str(devices),
                       "--main-port", port, str(ROOT / "rpp_lightning" / "cli.py")],
    }[launcher]  # fmt: skip


def train(cwd: Path, *overrides: str, devices: int = 1, launcher: str | None = None) -> Path:
    """Run `rpp-train fit` on configs/tiny.yaml in `cwd`; return the CSV log directory."""
    cwd.mkdir(parents=True, exist_ok=True)
    argv = [
        *launcher_argv(launcher, devices),
        *fit_args(
            "--trainer.enable_progress_bar", "false",
            "--trainer.devices", str(devices),
            *(["--trainer.strategy", "fsdp2"] if devices > 1 else []),
            *overrides,
        ),
    ]  # fmt: skip
    run_ok(argv, cwd)
    versions = sorted((cwd / "runs" / "tiny" / "csv").iterdir())
    return versions[-1]


def read_metrics(log_dir: Path) -> list[dict[str, float]]:
    """Rows of metrics.csv that hold training metrics, as floats."""
    with (log_dir / "metrics.csv").open() as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [row for row in rows if "policy_loss" in row]


def served_version(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        return stub.GetInfo(generation_pb2.GenerationInfoRequest(), timeout=10).weights_version


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A generation server on the tiny LM and a graded-reward server, shared by the module."""
    from conftest import ServerProcess

    from rpp_lightning.tiny import save_tiny_causal_lm

    model = save_tiny_causal_lm(tmp_path_factory.mktemp("policy"))
    generation = ServerProcess(
        python_module("rpp_lightning.generation.cli", "--model", str(model), "--port", "0")
    )
    verifier = "trainer_verifiers:DigitShareVerifier"
    rewards = ServerProcess(
        python_module("reward_servers.cli", "--verifier", verifier, "--port", "0"), env=ENV
    )
    yield {"model": model, "generation": generation.address, "reward": rewards.address}
    generation.stop()
    rewards.stop()


def remote(servers, *extra: str) -> list[str]:
    """Overrides that point tiny.yaml at the shared servers and the tiny LM directory."""
    return [
        "--model.policy.config", "null",
        "--model.policy.tokenizer", "null",
        "--model.policy.path", str(servers["model"]),
        "--model.generation.local", "false",
        "--model.generation.addresses", f"[{servers['generation']}]",
        # list items merge with the YAML's by position: say `local: null` explicitly
        "--model.rewards",
        f"[{{name: digits, addresses: [{servers['reward']}], local: null, local_args: []}}]",
        *extra,
    ]  # fmt: skip


def batches(prompts: int, mini: int, micro: int) -> list[str]:
    return [
        "--data.batch_size", str(prompts),
        "--model.algorithm.mini_batch_size", str(mini),
        "--model.algorithm.micro_batch_size", str(micro),
    ]  # fmt: skip


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


PPO = ["--model.algorithm.advantage_estimator", "ppo", "--model.critic.optim.lr", "1e-3"]


def critic_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The critic's full weights from a single-file or a sharded (directory) checkpoint."""
    if checkpoint.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(checkpoint), str(checkpoint.with_suffix(".pt")))
        checkpoint = checkpoint.with_suffix(".pt")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("critic.")}


def test_trains_pushes_versions_and_resumes(servers, tmp_path) -> None:
    """End to end with `ppo`, whose state is a superset of the critic-free estimators': the
    policy and the critic (weights, optimizer, schedule) resume; the sharded resume test below
    covers REINFORCE++ itself."""
    # a 4-iteration run stopped after 2 (the LR schedule spans the 4 iterations)
    stop_early = [*PPO, "--model.rollout.max_iterations", "4", "--trainer.max_steps", "2"]
    first = train(tmp_path, *remote(servers, *stop_early))
    rows = read_metrics(first)
    assert len(rows) == 2  # max_steps counts policy steps: the critic's are not Lightning's
    for row in rows:
        for key in ("policy_loss", "grad_norm", "critic/value_loss", "critic/grad_norm"):
            assert math.isfinite(row[key]), key
        assert row["time/values"] > 0
    # one push before the first rollout (version v0+1), then one after each iteration
    versions = [int(row["weights_version"]) for row in rows]
    assert versions[1] == versions[0] + 1
    assert served_version(servers["generation"]) == versions[-1]
    # the trained policy differs from the initial weights, and the export loads back
    initial, trained = load_weights(servers["model"]), load_weights(first / "hf_export")
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    assert (first / "hf_export" / "tokenizer.json").exists()

    # resume: the step count and the weights version continue where the first run stopped
    ckpt = first / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    saved = checkpoint["state_dict"]
    assert any(k.startswith("policy.") for k in saved)
    assert not any(k.startswith("reference.") for k in saved)  # rebuilt from its path instead
    # the critic: its weights (the decoder moved from the policy's start), Adam and schedule
    assert len(checkpoint["optimizer_states"]) == len(checkpoint["lr_schedulers"]) == 2
    assert checkpoint["optimizer_states"][1]["state"], "the critic's Adam moments are saved"
    critic = critic_weights(ckpt)
    decoder = [k for k in initial if k.startswith("model.")]  # the LM head is not the critic's
    assert any(not torch.equal(initial[k], critic["critic." + k]) for k in decoder)
    assert "critic.value_head.weight" in critic
    four = [*PPO, "--model.rollout.max_iterations", "4"]
    second = train(tmp_path, *remote(servers, *four, "--ckpt_path", str(ckpt)))
    resumed = read_metrics(second)
    assert [int(r["step"]) for r in resumed] == [2, 3]
    assert int(resumed[0]["weights_version"]) > versions[-1]
    assert served_version(servers["generation"]) == int(resumed[-1]["weights_version"])

    # nothing lost: the resumed iterations 3-4 equal those of an uninterrupted 4-iteration run
    # (same prompts, same weights and optimizer state, same sampling seeds)
    straight = read_metrics(train(tmp_path / "straight", *remote(servers, *four)))
    assert any(r["critic/grad_norm"] > 0 for r in straight[2:])
    keys = ("reward", "response_length", "policy_loss", "grad_norm", "critic/values")
    for key in (*keys, "critic/value_loss"):
        expected = pytest.approx([r[key] for r in resumed], rel=1e-4, abs=1e-6)
        assert [r[key] for r in straight[2:]] == expected, key


def test_fsdp2_mixed_precision_matches_single_process(servers, tmp_path) -> None:
    """Same prompts and rollouts, one update: with FSDP2's bf16 mixed precision on 2 gloo ranks,
    the update of one fp32 process up to bf16 rounding."""
    common = [
        "--model.rollout.max_iterations", "1",
        "--model.rollout.temperature", "1",  # seeded per global prompt index: rank-independent
        "--model.optim.eps", "1e-3",  # Adam's first step is ~sign(g); a large eps keeps it smooth
        "--trainer.val_check_interval", "null",
        "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    # the same 4 prompts × 2 samples: one process, or 2 prompts on each of 2 ranks (that the
    # fp32 update on 2 ranks equals one process's, policy and critic, is the PPO test's)
    single = train(tmp_path / "single", *remote(servers, *common, *batches(4, 8, 4)))
    initial = load_weights(servers["model"])
    a = load_weights(single / "hf_export")
    assert max((a[k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # it moved

    # FSDP2's mixed precision (the CUDA default; forced on here): bf16 compute, fp32 master
    # weights and gradient reduction. The same rollouts; the same update up to bf16 rounding.
    mixed = train(
        tmp_path / "mixed",
        *remote(servers, *common, *batches(2, 4, 2), "--model.policy.mixed_precision", "true"),
        devices=2,
    )
    c = load_weights(mixed / "hf_export")
    assert all(t.dtype == torch.float32 for t in c.values())  # the master weights stay fp32
    delta = torch.cat([(a[k] - initial[k]).flatten() for k in initial])
    delta_mixed = torch.cat([(c[k] - initial[k]).flatten() for k in initial])
    cosine = torch.nn.functional.cosine_similarity(delta, delta_mixed, dim=0).item()
    assert cosine > 0.99 and 0.95 < (delta_mixed.norm() / delta.norm()).item() < 1.05
    fp32_row, mixed_row = read_metrics(single)[0], read_metrics(mixed)[0]
    assert mixed_row["reward"] == pytest.approx(fp32_row["reward"])
    # bf16 did run: the trainer's log-probs drift from the (fp32) server's by bf16 rounding
    # (measured: 4.5e-4 vs 1.7e-7 a token)
    assert mixed_row["logprob_gap"] > 100 * fp32_row["logprob_gap"]


def test_fsdp2_sharded_checkpoint_resumes_where_it_stopped(servers, tmp_path) -> None:
    """2 gloo ranks: the sharded checkpoint (torch.distributed.checkpoint) holds the policy and
    its optimizer state, not the frozen reference; the stopped run and its resumed part give,
    number for number, the uninterrupted run of the synchronous loop as it ran before
    asynchronous rollouts existed (tests/golden/sync_iterations.json, made with `torchrun`):
    `max_staleness: 0` changed nothing, and the launchers agree."""
    from torch.distributed.checkpoint import FileSystemReader

    common = [*batches(2, 4, 2), "--trainer.val_check_interval", "null",
              "--trainer.limit_val_batches", "0", "--model.export_dir", "null",
              "--model.rollout.max_iterations", "4"]  # fmt: skip
    # the first run's ranks are started by `fabric run`, the resumed run's by `torchrun
    # --nnodes 2`; the first says `max_staleness: 0`, the resumed one leaves the default
    first = train(
        tmp_path,
        *remote(servers, *common, "--trainer.max_steps", "2", "--model.rollout.max_staleness", "0"),
        devices=2, launcher="fabric-run",
    )  # fmt: skip
    ckpt = first / "checkpoints" / "last.ckpt"
    keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    assert any(k.startswith("state_dict.policy.") for k in keys)
    assert any(k.startswith("optimizer_0.") for k in keys)
    assert not any(k.startswith("state_dict.reference.") for k in keys)
    # resumed on "two nodes" of one rank each (global ranks span the nodes; each rank reads and
    # writes its own shard)
    resume = [*common, "--ckpt_path", str(ckpt)]
    resumed_dir, outputs = train_on_two_nodes(tmp_path / "resumed", *remote(servers, *resume))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    shards = sorted(p.name for p in (resumed_dir / "checkpoints" / "last.ckpt").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    stopped, resumed = read_metrics(first), read_metrics(resumed_dir)
    assert [int(r["step"]) for r in stopped + resumed] == [0, 1, 2, 3]
    assert int(resumed[0]["weights_version"]) > int(stopped[-1]["weights_version"])
    assert any(r["grad_norm"] > 0 for r in resumed), "no update: the comparison is vacuous"
    golden = json.loads((ROOT / "tests" / "golden" / "sync_iterations.json").read_text())
    for key in ("reward", "response_length", "policy_loss", "grad_norm", "kl"):
        expected = pytest.approx([r[key] for r in golden["iterations"]], rel=1e-4, abs=1e-6)
        assert [r[key] for r in stopped + resumed] == expected, key
    assert all(r["staleness/max"] == 0 for r in stopped + resumed)


def test_async_rollouts_on_two_fsdp2_ranks_stay_within_staleness_and_resume(
    servers, tmp_path
) -> None:
    """`max_staleness: 1` on 2 gloo ranks: after the first iteration, each batch is sampled while
    the previous update runs, by weights at most one version old, and its log π_old is that
    version's (the server's own log-probs agree to fp32 rounding). Resumed from its checkpoint,
    the run carries on at the next iteration: synchronously once (nothing in flight was saved),
    then overlapping again."""
    common = [*batches(2, 4, 2), "--trainer.val_check_interval", "null",
              "--trainer.limit_val_batches", "0", "--model.export_dir", "null",
              "--model.rollout.max_staleness", "1",
              "--model.rollout.max_iterations", "5"]  # fmt: skip
    first = train(tmp_path, *remote(servers, *common, "--trainer.max_steps", "3"), devices=2)
    resumed = train(
        tmp_path / "resumed",
        *remote(servers, *common, "--ckpt_path", str(first / "checkpoints" / "last.ckpt")),
        devices=2,
    )
    runs = {"first": read_metrics(first), "resumed": read_metrics(resumed)}
    assert [int(r["step"]) for r in runs["first"]] == [0, 1, 2]
    assert [int(r["step"]) for r in runs["resumed"]] == [3, 4]
    for name, rows in runs.items():
        staleness = [r["staleness/max"] for r in rows]
        assert staleness[0] == 0, name  # nothing asked for ahead yet: a synchronous batch
        assert all(s in (0, 1) for s in staleness), (name, staleness)
        for row in rows:
            # the oldest weights that sampled any rank's rollouts (each rank asks on its own,
            # so a push landing between their requests makes one rank's share fresher)
            oldest = row["weights_version/rollouts"]
            assert oldest == row["weights_version"] - 1 - row["staleness/max"], (name, row)
            assert row["staleness/refused"] == 0
            # π_old is the sampling version's: the fp32 server's log-probs agree with it
            assert row["logprob_gap"] < 1e-5, (name, row["logprob_gap"])
            assert row["time/rollout_wait"] >= 0 and row["time/generation_idle"] >= 0
    # the overlap happened (a push that lands before a request runs makes that batch fresher)
    assert any(r["staleness/max"] == 1 for r in runs["first"][1:]), runs["first"]
    assert all(math.isfinite(r["policy_loss"]) for r in runs["first"] + runs["resumed"])


def test_ppo_on_two_fsdp2_ranks_matches_one_process(servers, tmp_path) -> None:
    """The critic is sharded like the policy: rewards, values and the first update of both
    models on 2 gloo ranks equal one process's."""
    common = [
        *PPO, "--model.rollout.max_iterations", "1", "--model.optim.eps", "1e-3",
        "--model.critic.optim.eps", "1e-3", "--trainer.val_check_interval", "null",
        "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    single = train(tmp_path / "single", *remote(servers, *common, *batches(4, 8, 4)))
    # the ranks update in one micro-batch each, so they keep log π_old's forward for the update
    # (update.single_forward_update) while the one process runs two micro-batches: both paths
    # must give the same update
    sharded = train(tmp_path / "sharded", *remote(servers, *common, *batches(2, 4, 4)), devices=2)
    one, two = read_metrics(single)[0], read_metrics(sharded)[0]
    for key in ("reward", "critic/values", "critic/value_loss", "policy_loss", "kl"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    initial = load_weights(servers["model"])
    a, b = load_weights(single / "hf_export"), load_weights(sharded / "hf_export")
    for name in initial:
        delta_single, delta_sharded = a[name] - initial[name], b[name] - initial[name]
        torch.testing.assert_close(delta_sharded, delta_single, atol=2e-6, rtol=1e-3, msg=name)
    critic_one = critic_weights(single / "checkpoints" / "last.ckpt")
    critic_two = critic_weights(sharded / "checkpoints" / "last.ckpt")
    assert critic_one.keys() == critic_two.keys()
    head = "critic.value_head.weight"
    assert critic_one[head].abs().max() > 0
    for name, weight in critic_one.items():
        torch.testing.assert_close(critic_two[name], weight, atol=2e-6, rtol=1e-3, msg=name)
    decoder = {k: v for k, v in critic_one.items() if not k.startswith("critic.value_head")}
    moved = max((v - initial[k.removeprefix("critic.")]).abs().max() for k, v in decoder.items())
    assert moved > 1e-4, "the critic's update did not move it: the comparison would be vacuous"


def train_on_two_nodes(cwd: Path, *overrides: str) -> tuple[Path, list[str]]:
    """`torchrun --nnodes 2`, one rank per node, both nodes on this machine and in one directory
    (what a shared file system gives real nodes); returns the log directory and each node's
    output."""
    cwd.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    argv = [
        "torchrun", "--nnodes", "2", "--nproc_per_node", "1",
        "--master_addr", "127.0.0.1", "--master_port", port,
        "-m", "rpp_lightning.cli",
        *fit_args(
            "--trainer.enable_progress_bar", "false",
            "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "fsdp2",
            *overrides,
        ),
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [*argv[:1], "--node_rank", str(rank), *argv[1:]],
            cwd=cwd,
            env={**os.environ, **ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-6000:]
    return sorted((cwd / "runs" / "tiny" / "csv").iterdir())[-1], outputs


def test_progress_bar_counts_the_runs_iterations(servers, tmp_path) -> None:
    """Lightning's bar counts the epoch's 5000 batches ("3/5000"); ours stops at the run's 3.
    (The TQDM variant is checked in the SIGUSR1 export test's run.)"""
    argv = [
        sys.executable, "-m", "rpp_lightning.cli",
        *fit_args(
            *remote(servers, "--model.rollout.max_iterations", "3", "--model.export_dir", "null"),
        ),
    ]  # fmt: skip
    result = run_ok(argv, tmp_path, COLUMNS="250")  # Rich wraps at 80 columns off a terminal
    lines = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
    bars = [line for line in lines if line.startswith("Epoch 0")]
    assert bars, result.stdout[-3000:] + result.stderr[-3000:]
    assert " 3/3 " in bars[-1] and "/-2" not in bars[-1], bars[-1]
    for key in ("reward", "accuracy", "kl", "response_length"):
        assert key in bars[-1], key


def test_scoring_overlaps_the_log_probs(servers, tmp_path) -> None:
    """Rewards do not feed log π_old or log π_ref: the trainer computes them while scoring runs."""
    from conftest import ServerProcess
    from trainer_verifiers import SlowDigitShareVerifier

    slow = ServerProcess(
        python_module(
            "reward_servers.cli", "--verifier", "trainer_verifiers:SlowDigitShareVerifier",
            "--port", "0",
        ),
        env=ENV,
    )  # fmt: skip
    try:
        overrides = remote(servers, "--model.rollout.max_iterations", "3")
        overrides[overrides.index("--model.rewards") + 1] = (
            f"[{{name: digits, addresses: [{slow.address}], local: null, local_args: []}}]"
        )
        # micro-batches of 1: 16 forwards each for π_old and π_ref, log-probs long enough to see
        log_dir = train(tmp_path, *overrides, *batches(8, 16, 1), "--model.export_dir", "null")
    finally:
        slow.stop()
    for row in read_metrics(log_dir):
        assert row["time/score"] >= SlowDigitShareVerifier.SECONDS
        # in sequence the step would hold score + log-probs; overlapped, the log-probs hide
        # inside the score call and the trainer waits only for the rest of it
        waited_in_sequence = sum(
            row[f"time/{phase}"] for phase in ("generate", "score", "update", "weight_sync")
        )
        assert row["time/step"] - waited_in_sequence < 0.5 * row["time/logprobs"], row
        assert row["time/score_wait"] < row["time/score"] - 0.5 * row["time/logprobs"], row


def test_export_on_request_with_sigusr1(servers, tmp_path) -> None:
    """Also the TQDM progress bar's count (the default one, Rich here, has its own test)."""
    start = served_version(servers["generation"])
    argv = [
        sys.executable, "-m", "rpp_lightning.cli",
        *fit_args(
            "--trainer.callbacks+=rpp_lightning.trainer.progress.IterationTQDMProgressBar",
            *remote(servers, "--model.rollout.max_iterations", "4", "--model.export_dir", "null"),
        ),
    ]  # fmt: skip
    env = {**os.environ, **ENV, "COLUMNS": "250"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        # version start+2: the initial push and one iteration are done, so training is underway
        assert wait_for(lambda: served_version(servers["generation"]) >= start + 2, 120)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    for intended in ("in eval mode at the start", "Using ModelCheckpoint with manual optimiz"):
        assert intended not in output  # warnings about choices made on purpose stay quiet
    (log_dir,) = (tmp_path / "runs" / "tiny" / "csv").iterdir()
    exports = sorted(log_dir.glob("hf_export_iter*"))
    assert len(exports) == 1, output[-4000:]
    assert not (log_dir / "hf_export").exists()  # export_dir null: no export at the end
    exported = load_weights(exports[0])
    assert exported.keys() == load_weights(servers["model"]).keys()
    bars = [line for line in output.replace("\r", "\n").splitlines() if line.startswith("Epoch 0")]
    assert bars and " 4/4 " in bars[-1] and "/5000" not in bars[-1], output[-3000:]


def test_mixed_precision_without_fsdp2_is_refused(servers, tmp_path, monkeypatch) -> None:
    from rpp_lightning.cli import cli_main

    monkeypatch.chdir(tmp_path)
    args = fit_args(*remote(servers, "--model.policy.mixed_precision", "true"))[1:]
    module = cli_main(args, run=False).model
    with pytest.raises(
        ValueError, match=r"policy\.mixed_precision is FSDP2's: add --trainer\.strategy fsdp2"
    ):
        module.configure_model()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_checkpoint_of_the_trainer_before_its_parts_resumes(tmp_path) -> None:
    """tests/golden/tiny_iter2_before_parts.ckpt: 2 iterations of configs/tiny.yaml (its local
    servers), saved by the trainer of mixins (commit ddb93fe, before WeightSync, RolloutSource
    and ExperienceMaker were parts of their own). Today's trainer resumes it where it stopped:
    the iteration, the weights version (pushed again, then updated) and the optimizer state."""
    golden = ROOT / "tests" / "golden" / "tiny_iter2_before_parts.ckpt"
    saved = torch.load(golden, weights_only=False)["rpp"]
    assert (saved["iteration"], saved["weights_version"]) == (2, 3)
    tokenizer = str(ROOT / "assets" / "char_tokenizer")
    log_dir = train(
        tmp_path,
        *("--model.policy.tokenizer", tokenizer, "--model.rollout.max_iterations", "3"),
        *("--ckpt_path", str(golden)),
    )
    [row] = read_metrics(log_dir)
    assert int(row["step"]) == 2
    # 3 restored, 4 pushed to the fresh local server before the first rollout, 5 after the update
    assert (row["weights_version"], row["weights_version/rollouts"]) == (5.0, 4.0)
