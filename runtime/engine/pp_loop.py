"""Pipeline stages with micro-batches in flight: the token loop of a `--pp M` job.

The sequences are dealt into G groups (micro-batches, G = M by default). A round visits the
groups in order: it takes the group's tokens from its step of the previous round, then launches
the group's next step. Stage s launches group g + 1's step while stage s + 1 still runs group g's,
so with G >= M every stage has work; one step in flight (G = 1) is TokenLoop's lockstep.

Every rank runs this loop alike, so every rank launches the same steps in the same order: the
programs' SEND / RECV of activations pair up on the job's communicator in that order. The last
stage (its first shard: the root) has the logits; it samples the group's tokens as soon as its
step ends and sends them to every other rank on a channel of their own (`PipelineStep.publish`),
the others read them when the round comes back to the group (`receive`). The tokens travel on a
host channel apart from the device communicator: on one communicator the root's sends of group g
would queue behind the activations of group g + 1, which stage 0 sends before it waits for g's
tokens, and the two stages would each wait for the other.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

from .generate import StepLimits, TokenLoop, _Seq
from .kv_cache import KvExhausted, PagePool
from .sampler import SamplingParams


class MicroBatchLoop(TokenLoop):
    """TokenLoop over `groups` micro-batches, one step of each in flight. `stage` is the rank's
    PipelineStep (runtime/engine/pp_step.py)."""

    def __init__(self, stage, pool: PagePool, limits: StepLimits, prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams], groups: int):
        super().__init__(stage.inner, pool, limits, prompts, params, greedy=stage.inner.greedy)
        self.stage = stage
        self.groups: list[list[_Seq]] = [[] for _ in range(max(1, int(groups)))]

    def _admit_group(self, group: list[_Seq]) -> None:
        """Admits waiting sequences into `group` up to its share (the active sequences over the
        groups, so a few prompts still spread over all of them) and the step's sequence limit."""
        share = -(-(len(self.waiting) + len(self.running)) // len(self.groups))
        self._admit(group, min(share, self.limits.max_seqs))

    def _finish(self, s: _Seq, reason: str) -> None:
        super()._finish(s, reason)
        for group in self.groups:
            if s in group:
                group.remove(s)

    def run(self) -> Iterator[tuple[int, int]]:
        inflight: deque[tuple[int, list[_Seq], list[int] | None]] = deque()
        while self.waiting or self.running:
            for g, group in enumerate(self.groups):
                # group g's step of the last round is the oldest in flight: the steps of groups
                # g+1.. (last round) and 0..g-1 (this round) were launched after it
                if inflight and inflight[0][0] == g:
                    _, sampled, tokens = inflight.popleft()
                    yield from self._take(sampled, self.stage.receive(len(sampled)) if tokens is None else tokens)
                self._admit_group(group)
                batch = self._batch(group)
                if batch:
                    inflight.append((g, *self._launch(batch)))
            if not inflight and self.waiting and not self.running:
                raise KvExhausted("no sequence fits the KV pool")  # admission checked each fits an empty pool

    def _launch(self, batch) -> tuple[list[_Seq], list[int] | None]:
        """Runs the batch's step on this stage; on the root, also samples and sends its tokens."""
        inputs, sampled = self._inputs(batch)
        tokens = None
        if self.stage.is_root:
            tokens = self._step_tokens(inputs, sampled)
            if sampled:
                self.stage.publish(tokens)
        else:
            self.stage.inner(inputs)
        self._advance(batch)
        return sampled, tokens


__all__ = ["MicroBatchLoop"]
