"""Admission control and the one registry of request ids.

Every sequence a request starts holds a ticket from before anything is awaited until it
ends, so a burst is counted exactly, a request id in use is refused before the engine sees
it, and /abort_request finds a request's sequences in the same table.

Under --enable-priority-scheduling a full queue does not refuse an urgent request while a
less urgent one waits: the least urgent waiting request (the newest among equals) is
displaced, its sequences aborted in the engine and answered 503 with Retry-After. Running
sequences are never displaced: no generated token is lost.
"""

from __future__ import annotations

from collections.abc import Callable

from radixserve.api.errors import APIError, bad_request
from radixserve.config import ServerArgs
from radixserve.engine.client import owned_by, sequence_rids


class Admission:
    """Counts open sequences and the prompt tokens that wait for prefill; holds the
    ticket of every open sequence under its engine request id."""

    def __init__(self, args: ServerArgs, abort: Callable[[str], None] = lambda rid: None) -> None:
        self.args = args
        self.abort = abort  # tells the engine to drop a displaced sequence
        self.open_sequences = 0  # started and not yet finished
        self.queued_tokens = 0  # prompt tokens of open sequences with no output yet
        self.tickets: dict[str, AdmissionTicket] = {}
        self.arrivals = 0

    def admit(
        self, rid: str, prompt_lens: list[int], n: int, running: int, priority: int = 0
    ) -> list[AdmissionTicket]:
        """One ticket per sequence (n per prompt, in choice order). A request id that is in
        use, or that names a sequence of one in use, is a 400. Beyond the running capacity
        plus --max-queued-requests sequences, or beyond --max-queued-tokens prompt tokens
        waiting for their first token, a 503 at once (SGLang/vLLM users expect a fast
        refusal with Retry-After rather than an unbounded queue). A prompt longer than the
        token limit is still admitted when none waits."""
        rids = sequence_rids(rid, len(prompt_lens), n)
        if any(owned_by(r, rid) for r in self.tickets) or any(r in self.tickets for r in rids):
            raise bad_request(f"rid: request id {rid!r} is already in use", "rid")
        lens = [length for length in prompt_lens for _ in range(n)]
        limit = self.args.max_queued_requests
        if limit is not None and self.args.enable_priority_scheduling:
            while self.open_sequences + len(lens) - running > limit and self._displace(priority):
                pass
        if limit is not None and self.open_sequences + len(lens) - running > limit:
            raise overloaded(
                f"{self.open_sequences} sequences in flight, at most {limit} may wait beyond "
                f"the {running} running"
            )
        limit = self.args.max_queued_tokens
        if limit is not None and self.queued_tokens and self.queued_tokens + sum(lens) > limit:
            raise overloaded(
                f"{self.queued_tokens} prompt tokens wait for prefill, at most {limit} may"
            )
        self.arrivals += 1
        return [
            AdmissionTicket(self, r, length, rid, priority, self.arrivals)
            for r, length in zip(rids, lens, strict=True)
        ]

    def _displace(self, priority: int) -> bool:
        """Abort the least urgent waiting request if it is less urgent than `priority`."""
        waiting = [t for t in self.tickets.values() if not t.has_output and t.priority > priority]
        if not waiting:
            return False
        victim = max(waiting, key=lambda t: (t.priority, t.arrival))
        for t in [t for t in self.tickets.values() if t.request_rid == victim.request_rid]:
            t.displaced = True
            t.free()
            self.abort(t.rid)
        return True

    def running(self, rid: str | None) -> list[str]:
        """Engine ids of the sequences of `rid` (None: of every request) that have started."""
        return sorted(
            r for r, t in self.tickets.items() if t.has_output and (rid is None or owned_by(r, rid))
        )


class AdmissionTicket:
    """One admitted sequence. Its prompt tokens count as queued until its first output (it
    has been prefilled then); the sequence counts until it ends. Given back exactly once,
    however the sequence ends."""

    def __init__(
        self,
        admission: Admission,
        rid: str,
        prompt_tokens: int,
        request_rid: str = "",
        priority: int = 0,
        arrival: int = 0,
    ) -> None:
        self.admission: Admission | None = admission
        self.rid = rid
        self.request_rid = request_rid  # the API request this sequence belongs to
        self.priority = priority
        self.arrival = arrival
        self.displaced = False  # a more urgent request took its place (answered 503)
        self.queued = prompt_tokens
        self.has_output = False
        admission.open_sequences += 1
        admission.queued_tokens += prompt_tokens
        admission.tickets[rid] = self

    def started(self) -> None:
        """The sequence's first output came: its prompt no longer waits."""
        self.has_output = True
        if self.admission is not None and self.queued:
            self.admission.queued_tokens -= self.queued
            self.queued = 0

    def free(self) -> None:
        if self.admission is not None:
            self.admission.queued_tokens -= self.queued
            self.queued = 0
            self.admission.open_sequences -= 1
            self.admission.tickets.pop(self.rid, None)
            self.admission = None


def overloaded(why: str) -> APIError:
    return APIError(
        503,
        f"server overloaded: {why}; retry later",
        code="server_overloaded",
        headers={"Retry-After": "1"},
    )
