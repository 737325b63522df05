"""Neural preference (reward) model: a sequence classifier's scalar output is the reward.

    rpp-reward-server preference --model /path/to/reward-model --port 50052 \\
        --verifier-args max_length=4096 token_budget=65536

Loads any `AutoModelForSequenceClassification` with one label, plus its tokenizer, from a local
path. Each (prompt, response) goes through the tokenizer's chat template when it has one (user
turn, assistant turn), else is scored as prompt + response.

Dynamic batching: request threads only tokenize and enqueue; one batcher thread owns the model.
It takes every sequence waiting at that moment (from all concurrent requests), sorts them by
length (less padding), packs micro-batches whose padded size stays within `token_budget`, runs
them, and hands each request its scores. Sequences are right-padded: real tokens keep their
positions and, under causal attention, never see the padding, so a batched score equals the
score of the sequence run alone (the classifier pools the last non-pad token).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_servers.base import SampleInput, ScoreResult, Verifier, client_gone, wait_for_futures
from rpp_lightning.rpc.serving import StatusError

log = logging.getLogger("rpp.reward.preference")


@dataclass
class _Pending:
    """One request's tokenized samples waiting for the batcher."""

    ids: list[list[int]]
    future: futures.Future = field(default_factory=futures.Future)


def _resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if dtype == "auto":  # bf16 halves memory and is what reward models are trained in on GPU
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    return resolved, getattr(torch, dtype)


class PreferenceModel(Verifier):
    """Serves a local sequence-classification model as rewards, with dynamic batching."""

    kind = "preference"
    requires_reference = False

    def __init__(
        self,
        model_path: str,
        max_length: int = 2048,
        token_budget: int = 16384,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        """
        Args:
            model_path: directory saved with `save_pretrained` (model and tokenizer).
            max_length: longest sequence in tokens; longer ones keep their last max_length.
            token_budget: most tokens (padding included) in one forward micro-batch.
            device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
            dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", ...
        """
        if max_length < 1 or token_budget < max_length:
            raise ValueError(
                f"need 1 <= max_length <= token_budget, got {max_length=} {token_budget=}"
            )
        self.name = str(model_path)
        self.max_length = max_length
        self.token_budget = token_budget
        self.device, self.dtype = _resolve(device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=self.dtype)
        if model.config.num_labels != 1:
            raise ValueError(
                f"{model_path}: a reward model has 1 label, not {model.config.num_labels}"
            )
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        if model.config.pad_token_id is None:
            # The classifier finds each sequence's last token as "last token != pad_token_id";
            # without a pad id it refuses batches larger than one.
            model.config.pad_token_id = self.pad_id
        self.model = model.to(self.device).eval()
        self.version = str(getattr(model.config, "_commit_hash", None) or "local")
        # HF fast tokenizers reset their truncation state on every call, which raises "Already
        # borrowed" when two threads encode at once; the lock is held for microseconds.
        self._tokenize_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._batcher = threading.Thread(target=self._batch_loop, name="batcher", daemon=True)
        self._batcher.start()
        log.info("loaded %s on %s (%s)", model_path, self.device, self.dtype)

    def encode(self, sample: SampleInput) -> list[int]:
        """Token ids of one sample: chat template when the tokenizer has one, else plain text."""
        if self.tokenizer.chat_template:
            messages = [
                {"role": "user", "content": sample.prompt},
                {"role": "assistant", "content": sample.response},
            ]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(sample.prompt + sample.response)["input_ids"]
        # Keep the END: the classifier reads the last token, which must be the response's end.
        return ids[-self.max_length :]

    @torch.inference_mode()
    def forward(self, batch: list[list[int]]) -> list[float]:
        """Scores of one micro-batch, right-padded (see the module docstring for why right)."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
        ).logits  # (B, 1)
        return logits[:, 0].float().cpu().tolist()

    def score(self, samples: list[SampleInput], deadline_s: float | None) -> list[ScoreResult]:
        """Tokenize here, score in the batcher together with other requests' samples."""
        with self._tokenize_lock:
            pending = _Pending([self.encode(s) for s in samples])
        start = time.monotonic()
        self._queue.put(pending)
        if wait_for_futures([pending.future], deadline_s, client_gone()):
            pending.future.cancel()  # the batcher skips it if it has not started it yet
            if deadline_s is not None and time.monotonic() - start >= deadline_s:
                raise StatusError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline passed before {len(samples)} samples were scored",
                )
            raise StatusError(
                grpc.StatusCode.CANCELLED,
                f"the client went away before {len(samples)} samples were scored",
            )
        rewards = pending.future.result()
        return [
            ScoreResult(reward, {"tokens": str(len(ids))})
            for reward, ids in zip(rewards, pending.ids, strict=True)
        ]

    def _take_waiting(self) -> list[_Pending] | None:
        """Block for one request, then take every other one already queued (None: stop)."""
        first = self._queue.get()
        if first is None:
            return None
        taken = [first]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this round
                break
            taken.append(item)
        return [p for p in taken if p.future.set_running_or_notify_cancel()]

    def _micro_batches(self, requests: list[_Pending]) -> list[list[tuple[int, int]]]:
        """(request, sample) index pairs grouped so each padded batch fits the token budget."""
        order = sorted(
            ((r, s) for r, p in enumerate(requests) for s in range(len(p.ids))),
            key=lambda rs: len(requests[rs[0]].ids[rs[1]]),
            reverse=True,
        )
        batches: list[list[tuple[int, int]]] = []
        for index in order:
            # Sorted longest first, so a batch's first sequence sets its padded width.
            if batches:
                width = len(requests[batches[-1][0][0]].ids[batches[-1][0][1]])
                if (len(batches[-1]) + 1) * width <= self.token_budget:
                    batches[-1].append(index)
                    continue
            batches.append([index])
        return batches

    def _batch_loop(self) -> None:
        while True:
            requests = self._take_waiting()
            if requests is None:
                return
            if not requests:
                continue
            scores = [[0.0] * len(p.ids) for p in requests]
            try:
                for batch in self._micro_batches(requests):
                    outputs = self.forward([requests[r].ids[s] for r, s in batch])
                    for (r, s), value in zip(batch, outputs, strict=True):
                        scores[r][s] = value
            except Exception as exc:  # e.g. CUDA OOM: fail these requests, keep serving
                log.exception("forward failed")
                for p in requests:
                    p.future.set_exception(exc)
                continue
            for p, values in zip(requests, scores, strict=True):
                p.future.set_result(values)

    def close(self) -> None:
        """Stop the batcher thread."""
        self._queue.put(None)
        self._batcher.join(timeout=10)
