"""Iteration time on a small model: our trainer against TRL's GRPOTrainer, same shapes, one run.

    pip install -e ".[bench]"                  # trl, only for this benchmark
    python benchmarks/peer_speed.py --rounds 2 --steps 12

The shapes (issue 17): a random Qwen2 with hidden size 128 and 4 layers on the project's
character tokenizer; 8 prompts × 4 samples × up to 32 new tokens a step, one optimizer step over
the 32 samples, 2 threads. Ours: `configs/tiny.yaml` with those overrides (PEER_SHAPES), its
local generation and math-verify reward servers over gRPC, a checkpoint every iteration as the
tiny config has it; timed whole, from one step's start to the next. TRL: `GRPOTrainer` as a user
runs it (generation in-process with `model.generate`, math-verify in-process), timed from one
step's start to the next with a callback.

Both sides compute the same thing in two settings, each measured:
- without a KL term: TRL's default `beta=0`, ours `kl_coef 0`; neither loads a reference model;
- with one: TRL `beta=0.001` (a k3 penalty in the loss), ours the tiny config's `kl_coef 0.001`
  (k1 in the reward); each runs one reference forward per step.
Without a KL term ours also runs once more with no checkpoints (`no_kl_no_ckpt`), as TRL runs
here: what is left between the two is then the weight push to a separate server.
The runs alternate `--rounds` times so the machine's drift hits every one; medians over the
steps after the first two of each run. Without trl importable, TRL's side is skipped with a line
saying so. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "assets" / "char_tokenizer"
MODEL = {  # a random Qwen2 on the character tokenizer (vocabulary 104)
    "model_type": "qwen2", "vocab_size": 104, "hidden_size": 128, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False,
}  # fmt: skip
PROMPTS, SAMPLES, NEW_TOKENS = 8, 4, 32
PEER_SHAPES = [
    "--model.policy.config", json.dumps(MODEL),
    "--data.batch_size", str(PROMPTS),
    "--model.rollout.n_samples", str(SAMPLES),
    "--model.rollout.max_new_tokens", str(NEW_TOKENS),
    "--model.algorithm.mini_batch_size", str(PROMPTS * SAMPLES),
    "--model.algorithm.micro_batch_size", str(PROMPTS * SAMPLES),
]  # fmt: skip
"""`rpp-train` overrides of configs/tiny.yaml for the peer shapes (also step_breakdown's)."""
WARMUP = 2  # steps left out of each run's median
KL_COEFS = {"no_kl": 0.0, "kl": 0.001}  # ours kl_coef = TRL beta, per setting


def ours(steps: int, kl_coef: float, checkpoints: bool = True) -> list[float]:
    """Whole-iteration times of `rpp-train fit --config configs/tiny.yaml` on the peer shapes."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            sys.executable, "-m", "rpp_lightning.cli", "fit", "--config", "configs/tiny.yaml",
            *PEER_SHAPES,
            "--model.algorithm.kl_coef", str(kl_coef),
            "--model.rollout.max_iterations", str(steps),
            "--trainer.default_root_dir", tmp,
            "--trainer.logger", f"[{{class_path: lightning.pytorch.loggers.CSVLogger, "
            f"init_args: {{save_dir: {tmp}, name: csv}}}}]",
            "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--model.export_dir", "null",
        ]  # fmt: skip
        if not checkpoints:  # as TRL runs here (save_strategy "no")
            argv += ["--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"]
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
        (metrics,) = Path(tmp).glob("csv/*/metrics.csv")
        import csv

        with metrics.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("time/previous_iteration")]
    # row k carries iteration k-1's whole time (its start to the next start)
    return [float(r["time/previous_iteration"]) for r in rows]


def trl_worker(steps: int, beta: float) -> None:
    """Run TRL's GRPOTrainer for `steps` steps; print the step times as one JSON list."""
    import time

    import torch
    from datasets import Dataset
    from math_verify import parse, verify
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    settings = dict(MODEL)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = [json.loads(line) for line in (ROOT / "data/arithmetic/train.jsonl").open()]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
         for r in rows[: PROMPTS * (steps + 1)]]
    )  # fmt: skip

    def math_reward(completions, answer, **_) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [float(verify(parse(a), parse(t))) for t, a in zip(texts, answer, strict=True)]

    starts: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        # from a directory, as a user has it: TRL loads its reference model (beta > 0) from there
        model.save_pretrained(f"{tmp}/model")
        args = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=PROMPTS * SAMPLES,
            num_generations=SAMPLES, max_completion_length=NEW_TOKENS, max_steps=steps,
            learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, beta=beta,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=f"{tmp}/model", reward_funcs=math_reward, args=args, train_dataset=dataset,
            processing_class=tokenizer, callbacks=[StepTimes()],
        )  # fmt: skip
        trainer.train()
    print(json.dumps([b - a for a, b in itertools.pairwise(starts)]))


def trl(steps: int, beta: float) -> list[float] | None:
    """TRL's step times from a fresh process, or None when trl is not importable."""
    try:
        import trl as _  # noqa: F401
    except ImportError:
        return None
    argv = [sys.executable, __file__, "--trl-worker", "--steps", str(steps), "--beta", str(beta)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args.steps, args.beta)
        return 0
    ours_times = {setting: [] for setting in [*KL_COEFS, "no_kl_no_ckpt"]}
    trl_times = {setting: [] for setting in KL_COEFS}
    have_trl = True
    for round_ in range(args.rounds):
        for setting, kl_coef in KL_COEFS.items():
            mine = ours(args.steps, kl_coef)[WARMUP - 1 :]  # row 0 already skips iteration 0
            ours_times[setting] += mine
            theirs = trl(args.steps, kl_coef) if have_trl else None
            if theirs is None:
                have_trl = False
                print("trl is not importable: TRL's side skipped (pip install -e '.[bench]')")
            else:
                trl_times[setting] += theirs[WARMUP:]
            if setting == "no_kl":
                bare = ours(args.steps, kl_coef, checkpoints=False)[WARMUP - 1 :]
                ours_times["no_kl_no_ckpt"] += bare
                print(f"round {round_} no_kl_no_ckpt: ours median {statistics.median(bare):.3f} s")
            print(
                f"round {round_} {setting}: ours median {statistics.median(mine):.3f} s"
                + (f", TRL median {statistics.median(theirs[WARMUP:]):.3f} s" if theirs else ""),
                flush=True,
            )
    result = {}
    trl_times["no_kl_no_ckpt"] = trl_times["no_kl"]  # TRL never checkpoints here
    for setting in ours_times:
        mine = ours_times[setting]
        result[f"{setting}/ours_iteration_s_median"] = statistics.median(mine)
        result[f"{setting}/ours_iteration_s_range"] = [min(mine), max(mine)]
        result[f"{setting}/iterations_measured"] = len(mine)
        if have_trl:
            theirs = trl_times[setting]
            result[f"{setting}/trl_step_s_median"] = statistics.median(theirs)
            result[f"{setting}/trl_step_s_range"] = [min(theirs), max(theirs)]
            result[f"{setting}/ours_over_trl"] = statistics.median(mine) / statistics.median(theirs)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
