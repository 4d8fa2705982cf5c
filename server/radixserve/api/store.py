"""The in-memory store of /v1/responses: responses created with `store: true`, kept for
`previous_response_id`, GET and cancel, in this HTTP process only (a restart forgets them,
replicas do not share them). Bounded by --responses-store-size: beyond it the least
recently used response is dropped, and a later reference to it is a 404.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class StoredResponse:
    """A response as the API returns it, the conversation it ends (chat messages: its input
    and its output, what a follow-up continues from), and while it runs, how to stop it."""

    body: dict
    conversation: list[dict] = field(default_factory=list)
    cancel: Callable[[], None] | None = None  # set while a background or streamed one runs
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ResponseStore:
    """An LRU map from response id to StoredResponse, at most `size` entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, rid: str, item: StoredResponse) -> None:
        self._items[rid] = item
        self._items.move_to_end(rid)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, rid: str) -> StoredResponse | None:
        item = self._items.get(rid)
        if item is not None:
            self._items.move_to_end(rid)
        return item

    def delete(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None

    def __len__(self) -> int:
        return len(self._items)
