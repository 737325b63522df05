"""What the trainer does when its servers fail, so that a run loses nothing.

- Every remote call retries within `model.failure_policy` (`replicas.ReplicaSet`): a lost
  replica's work goes to the others, and while a whole service is down for less than the retry
  budget the trainer waits and carries on.
- A generation replica that serves other weights than the trainer's (restarted at version 0, or
  it missed a push) refuses to generate, and its prompts go to the replicas that serve the right
  version. When none does, every rank agrees on it, the trainer pushes its weights to every
  replica again as a new version, and the batch is generated again (`RolloutSource` in
  rollout_source.py, with `WeightSync.push_again` from weight_sync.py). No rollout from other
  weights is ever trained on: the servers refuse them and the client checks every version stamp.
- A push that reaches no replica at the end of an iteration does not stop the run: the trainer's
  version still moves on, so the next iteration finds no replica serving it and pushes again.
- Past the budget, the ranks agree on it before their next collective (none is left waiting in
  one): the part that called raises ServerFailure on every rank alike; the module saves a
  checkpoint of the state before this iteration (nothing of it was trained on;
  `stop_for_server_failure` in trainer/checkpoints.py) and raises TrainingInterrupted, which
  names the service, its addresses and the last status; `rpp-train` then exits with
  EXIT_SERVER_FAILURE.

This module holds the errors; it imports none of the parts that raise them.
"""

from __future__ import annotations

EXIT_SERVER_FAILURE = 75
"""`rpp-train`'s exit status when servers failed past the budget (EX_TEMPFAIL: resume later)."""


class ServerFailure(RuntimeError):
    """A remote call failed past the failure policy; raised on every rank alike."""


class WeightPushError(RuntimeError):
    """A weight push reached no generation replica; raised on every rank alike."""


class TrainingInterrupted(RuntimeError):
    """The run stopped on a server failure, after saving `checkpoint`."""

    def __init__(self, message: str, checkpoint: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
