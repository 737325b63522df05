"""Prompt datasets: local JSONL, Parquet or a saved Hugging Face dataset directory.

Each row becomes a `PromptRow`: the prompt as the policy sees it (chat template applied when the
tokenizer has one), its token ids, the reference answer and the other columns as string metadata
(which reward sources may route on). Batches are lists of rows; the trainer does the rest.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from rpp_lightning.rl.experience import PromptRow

log = logging.getLogger("rpp.data")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json-lines file, a .parquet file, or a `save_to_disk` directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take its train split
            if "train" not in dataset:
                raise ValueError(f"{path} holds splits {list(dataset)}, none named 'train'")
            dataset = dataset["train"]
        return [dict(row) for row in dataset]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open() as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from exc
        return rows
    raise ValueError(f"unsupported dataset format {path.suffix!r}: use .jsonl, .parquet or a dir")


class ResumableSampler(Sampler[int]):
    """Each rank's share of a per-epoch shuffle; resumes mid-epoch without repeating prompts.

    Step t of the epoch covers shuffled prompts [t·B·W, (t+1)·B·W) for batch size B and W
    ranks, and rank r takes the contiguous block [t·B·W + r·B, t·B·W + (r+1)·B). So the union of
    all ranks' batches at a step is what a single process with batch B·W would see, in the same
    order: runs are comparable (and seeds line up) across world sizes. Every rank gets the same
    number of prompts (the tail is dropped), so every rank runs the same number of steps and
    FSDP collectives. `skip_batches()` says how many batches of this epoch were already trained
    on; it is read when iteration starts, i.e. after a checkpoint is restored.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        skip_batches: Callable[[], int] | None = None,
    ) -> None:
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.skip_batches = skip_batches or (lambda: 0)
        self._last_order: tuple[int | None, list[int]] = (None, [])  # (epoch, its shuffle)
        self.steps = size // (batch_size * world_size)
        if self.steps == 0:
            raise ValueError(
                f"{size} prompts cannot fill one batch of {batch_size} "
                f"on each of {world_size} ranks"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self) -> Iterator[int]:
        order = self._order(self.epoch)
        for step in range(self.skip_batches(), self.steps):
            yield from self._block(order, step)

    def batch_at(self, iteration: int) -> list[int]:
        """This rank's prompt indices of a run's `iteration` (counted over epochs, from 0): what
        iterating would yield then. Asynchronous rollouts ask for batches ahead with it."""
        epoch, step = divmod(iteration, self.steps)
        return self._block(self._order(epoch), step)

    def _order(self, epoch: int) -> list[int]:
        """The epoch's shuffle, kept for the next call (batches asked for ahead would otherwise
        redraw the whole permutation every iteration: ~1 ms for 20k prompts)."""
        if self._last_order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.size, generator=generator).tolist()
            else:
                order = list(range(self.size))
            self._last_order = (epoch, order)
        return self._last_order[1]

    def _block(self, order: list[int], step: int) -> list[int]:
        start = step * self.batch_size * self.world_size + self.rank * self.batch_size
        return order[start : start + self.batch_size]


def _check_rows(
    rows: list[dict[str, Any]], prompt_column: str, reference_column: str | None, source: str
) -> None:
    """Refuse, naming the file and the first bad row, rows the run could not use: missing the
    prompt or reference column (or holding null there), or with an empty prompt."""
    for column in (prompt_column, reference_column):
        if column is None:
            continue
        bad = [i for i, row in enumerate(rows) if row.get(column) is None]
        if bad:
            present = list(rows[bad[0]])
            raise ValueError(
                f"{source}: {len(bad)} rows have no column {column!r} (first: row {bad[0]}, "
                f"columns {present}); set data.prompt_column / data.reference_column"
            )
    empty = [i for i, row in enumerate(rows) if not str(row[prompt_column]).strip()]
    if empty:
        raise ValueError(
            f"{source}: {len(empty)} rows have an empty {prompt_column!r} (first: row {empty[0]})"
        )


class PromptDataModule(pl.LightningDataModule):
    """Prompts for training and held-out evaluation."""

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        val_size: int = 0,
        tokenizer: str | None = None,
        prompt_column: str = "prompt",
        reference_column: str | None = "answer",
        batch_size: int = 8,
        val_batch_size: int = 32,
        max_prompt_tokens: int = 512,
        too_long: Literal["filter", "error"] = "filter",
        apply_chat_template: bool = True,
        system_prompt: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            train_path: JSONL, Parquet or saved HF dataset directory of training prompts.
            val_path: held-out prompts; alternatively `val_size` rows split off `train_path`.
            val_size: rows of `train_path` held out for evaluation when `val_path` is not given.
            tokenizer: tokenizer directory (the CLI links it to the policy's).
            prompt_column: column holding the prompt text.
            reference_column: column holding the reference answer (None: no reference).
            batch_size: prompts per training iteration per rank.
            val_batch_size: prompts per evaluation batch per rank.
            max_prompt_tokens: longest prompt, in tokens, after the chat template.
            too_long: drop longer prompts with a warning ("filter") or refuse to start ("error").
            apply_chat_template: wrap prompts in the tokenizer's chat template when it has one.
            system_prompt: system message prepended when the chat template is applied.
            seed: seed of the shuffle and of the held-out split.
        """
        super().__init__()
        self.save_hyperparameters()
        self.train_rows: list[PromptRow] = []
        self._sampler: ResumableSampler | None = None  # the training dataloader's
        self.val_rows: list[PromptRow] = []

    def _tokenizer(self):
        from transformers import AutoTokenizer

        if self.hparams.tokenizer is None:
            raise ValueError("PromptDataModule needs a tokenizer directory")
        return AutoTokenizer.from_pretrained(self.hparams.tokenizer)

    def _to_prompt_rows(
        self, rows: list[dict[str, Any]], tokenizer, source: str
    ) -> list[PromptRow]:
        hp = self.hparams
        _check_rows(rows, hp.prompt_column, hp.reference_column, source)
        templated = hp.apply_chat_template and tokenizer.chat_template is not None
        texts = [str(row[hp.prompt_column]) for row in rows]
        if templated:
            system = [{"role": "system", "content": hp.system_prompt}] if hp.system_prompt else []
            texts = [
                tokenizer.apply_chat_template(
                    [*system, {"role": "user", "content": text}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for text in texts
            ]
        # one batched call: a fast tokenizer does 20k prompts in a fraction of the per-row time
        all_ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"] if texts else []
        out, too_long = [], []
        skip = {hp.prompt_column, hp.reference_column}
        for index, (row, text, ids) in enumerate(zip(rows, texts, all_ids, strict=True)):
            if len(ids) > hp.max_prompt_tokens:
                too_long.append(index)
                continue
            reference = str(row[hp.reference_column]) if hp.reference_column else ""
            metadata = {k: str(v) for k, v in row.items() if k not in skip and v is not None}
            out.append(PromptRow(text, list(ids), reference, metadata))
        if too_long:
            message = (
                f"{source}: {len(too_long)} prompts are longer than max_prompt_tokens="
                f"{hp.max_prompt_tokens} (first: row {too_long[0]})"
            )
            if hp.too_long == "error":
                raise ValueError(message + "; raise the limit or set too_long: filter")
            log.warning("%s; dropped", message)
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows:
            return
        hp = self.hparams
        tokenizer = self._tokenizer()
        train = read_rows(hp.train_path)
        if hp.val_path:
            val = read_rows(hp.val_path)
        elif hp.val_size:
            if hp.val_size >= len(train):
                raise ValueError(f"val_size {hp.val_size} leaves no training rows of {len(train)}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed))
            held = set(order[: hp.val_size].tolist())
            val = [row for i, row in enumerate(train) if i in held]
            train = [row for i, row in enumerate(train) if i not in held]
        else:
            val = []
        self.train_rows = self._to_prompt_rows(train, tokenizer, hp.train_path)
        self.val_rows = self._to_prompt_rows(val, tokenizer, hp.val_path or "held-out split")

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def _completed_batches(self) -> int:
        # On resume Lightning restores the loop's progress but does not fast-forward the data;
        # skipping the batches this epoch already trained on continues where the run stopped.
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed

    def train_batch(self, iteration: int) -> list[PromptRow]:
        """This rank's prompt rows of the run's `iteration` (the training dataloader's batch
        then), for the rollouts asked for ahead of it."""
        if self._sampler is None:
            raise RuntimeError("train_batch needs the training dataloader to exist")
        return [self.train_rows[i] for i in self._sampler.batch_at(iteration)]

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = self._sampler = ResumableSampler(
            len(self.train_rows),
            self.hparams.batch_size,
            rank,
            world,
            self.hparams.seed,
            skip_batches=self._completed_batches,
        )
        return DataLoader(
            self.train_rows,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=list,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        rank, world = self._rank_world()
        per_rank = math.ceil(len(self.val_rows) / world)
        # every rank evaluates its contiguous share; ranks may differ by one batch at the end
        share = self.val_rows[rank * per_rank : (rank + 1) * per_rank]
        return DataLoader(share, batch_size=self.hparams.val_batch_size, collate_fn=list)
