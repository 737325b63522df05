"""Supervised fine-tuning (SFT) of a causal LM on prompt → reference-answer pairs.

The quickstart's policy comes from here: a small Llama trained to imitate an imperfect teacher
on the arithmetic task (answers in `\\boxed{answer}`, 60 % of them rounded to the nearest ten),
so it answers in the format but often wrongly, and REINFORCE++ with an exact-match verifier has
something to improve. It is also a plain SFT you can point at any JSONL of prompts/answers.

    python -m rpp_lightning.sft fit --config configs/sft_quickstart.yaml
    python -m rpp_lightning.sft fit --config configs/sft_quickstart.yaml --model.out_dir /tmp/p

Prompts go through the same `PromptDataModule` as REINFORCE++ (same chat template, same token
ids), so the policy is trained on exactly the prompts it will see in RL. The loss covers the
response tokens only (prompt and padding are masked with -100). `val/exact_match` is the share of
held-out rows whose whole response (including EOS) is the argmax under teacher forcing: exactly
the rows that greedy decoding answers word for word.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from rpp_lightning.cli import RppCLI
from rpp_lightning.config import OptimConfig, PolicyConfig
from rpp_lightning.rl.experience import PromptRow
from rpp_lightning.rl.policy import export_hf, full_state_dict, load_causal_lm
from rpp_lightning.trainer.data import PromptDataModule

log = logging.getLogger("rpp.sft")

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt and padding), as torch's cross-entropy expects."""


def sft_example(row: PromptRow, tokenizer, response_template: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row: the prompt ids, then the response and EOS to learn."""
    response = response_template.format(answer=row.reference)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = [*response_ids, tokenizer.eos_token_id]
    input_ids = row.prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(row.prompt_ids) + response_ids
    return input_ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each (B, L)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, L)
    for i, (ids, target) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(target)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SFTDataModule(pl.LightningDataModule):
    """Prompt → `response_template` pairs from the prompt datasets REINFORCE++ reads."""

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        tokenizer: str | None = None,
        prompt_column: str = "prompt",
        reference_column: str = "answer",
        response_template: str = "\\boxed{{{answer}}}",
        batch_size: int = 64,
        val_batch_size: int = 256,
        max_prompt_tokens: int = 512,
        seed: int = 0,
    ) -> None:
        """
        Args:
            train_path: JSONL, Parquet or saved HF dataset directory of training rows.
            val_path: held-out rows (for val/loss and val/exact_match).
            tokenizer: tokenizer directory (the CLI links it to the policy's).
            prompt_column: column holding the prompt text.
            reference_column: column holding the answer the response is built from.
            response_template: the response to learn; `{answer}` is the reference. The default
                is what the math verifier reads first: `\\boxed{12}`.
            batch_size: rows per optimizer step.
            val_batch_size: rows per evaluation batch.
            max_prompt_tokens: longer prompts are dropped (as in REINFORCE++).
            seed: seed of the shuffle.
        """
        super().__init__()
        self.save_hyperparameters()
        self.train_examples: list[tuple[list[int], list[int]]] = []
        self.val_examples: list[tuple[list[int], list[int]]] = []
        self.pad_id = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        from transformers import AutoTokenizer

        hp = self.hparams
        prompts = PromptDataModule(
            train_path=hp.train_path,
            val_path=hp.val_path,
            tokenizer=hp.tokenizer,
            prompt_column=hp.prompt_column,
            reference_column=hp.reference_column,
            max_prompt_tokens=hp.max_prompt_tokens,
        )
        prompts.setup()
        tokenizer = AutoTokenizer.from_pretrained(hp.tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        template = hp.response_template
        self.train_examples = [sft_example(r, tokenizer, template) for r in prompts.train_rows]
        self.val_examples = [sft_example(r, tokenizer, template) for r in prompts.val_rows]

    def _collate(self, examples):
        return collate(examples, self.pad_id)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.train_examples,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=True,
            collate_fn=self._collate,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_examples:
            return []
        return DataLoader(
            self.val_examples, batch_size=self.hparams.val_batch_size, collate_fn=self._collate
        )


class SFT(pl.LightningModule):
    """Cross-entropy on response tokens; writes a `from_pretrained` directory at the end."""

    def __init__(
        self,
        policy: PolicyConfig,
        optim: OptimConfig | None = None,
        out_dir: str | None = None,
    ) -> None:
        """
        Args:
            policy: the model to train: a local directory (`path`) or a transformers `config`
                dict with random weights; `tokenizer` is saved next to it.
            optim: AdamW and its warmup + cosine schedule over `trainer.max_steps`.
            out_dir: where to write the trained model and tokenizer (`save_pretrained`);
                None: only Lightning's own checkpoints.
        """
        super().__init__()
        policy.validate()
        self.policy_config = policy
        self.optim = optim or OptimConfig(lr=1e-3, warmup_ratio=0.02)
        self.out_dir = out_dir
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:  # configure_model may run once per stage
            self.model = load_causal_lm(self.policy_config)
            log.info("policy: %d parameters", sum(p.numel() for p in self.model.parameters()))

    def _logits_and_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # (B, L, V)
        logits = logits[:, :-1].float()  # (B, L-1, V): position t predicts token t+1
        labels = batch["labels"][:, 1:]  # (B, L-1)
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX
        )
        return logits, labels, loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, _, loss = self._logits_and_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, labels, loss = self._logits_and_loss(batch)
        scored = labels != IGNORE_INDEX  # (B, L-1)
        hits = (logits.argmax(-1) == labels) | ~scored  # (B, L-1)
        exact = hits.all(dim=1).float().mean()  # greedy decoding reproduces the response
        size = len(labels)
        self.log("val/loss", loss, prog_bar=True, batch_size=size)
        self.log("val/exact_match", exact, prog_bar=True, batch_size=size)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.optim.lr,
            betas=self.optim.betas,
            eps=self.optim.eps,
            weight_decay=self.optim.weight_decay,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(total * self.optim.warmup_ratio)
        floor = self.optim.min_lr_ratio

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.out_dir is None:
            return
        from transformers import AutoTokenizer

        state = full_state_dict(self.model)
        if self.global_rank == 0:
            tokenizer_dir = self.policy_config.tokenizer or self.policy_config.path
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            export_hf(self.model, state, tokenizer, self.out_dir)
            print(f"saved the SFT policy to {self.out_dir}", flush=True)
        self.trainer.strategy.barrier("rpp-sft-export")


def cli_main(args: list[str] | None = None, run: bool = True):
    """`python -m rpp_lightning.sft fit --config ...`: the same CLI conventions as `rpp-train`."""
    return RppCLI(
        SFT,
        SFTDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults={"num_sanity_val_steps": 0},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m rpp_lightning.sft"},
    )


def main() -> int:
    cli_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
