"""The offline Engine: SGLang's `sgl.Engine` shape, with no HTTP server.

The engine loop runs in its own process; this object keeps an asyncio loop on a background
thread for the client side, so plain synchronous code can call `generate`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any

from radixserve.config import ServerArgs
from radixserve.engine.client import EngineClient, GenerateChunk
from radixserve.engine.sampling_params import SamplingParams


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="radixserve-client", daemon=True
        )
        self._thread.start()
        self.client = EngineClient(self.server_args)
        try:
            self.info = self._call(self.client.start())
        except BaseException:
            self.shutdown()
            raise
        self.tokenizer = self.client.tokenizer

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (a dict back) or a batch (a list back, n per prompt)."""
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        single = isinstance(prompt, str) or (
            input_ids is not None and input_ids and isinstance(input_ids[0], int)
        )
        if prompt is not None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch_ids = [self.client.encode(t) for t in texts]
        else:
            batch_ids = [list(input_ids)] if single else [list(x) for x in input_ids]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(batch_ids):
                raise ValueError("sampling_params list must have one entry per prompt")
            plist = [SamplingParams.from_dict(p) for p in sampling_params]
        else:
            plist = [SamplingParams.from_dict(sampling_params)] * len(batch_ids)
        for p in plist:
            p.verify(self.info.vocab_size)
        kw = {"return_logprob": return_logprob, "top_logprobs_num": top_logprobs_num}
        if stream:
            if not single or plist[0].n != 1:
                raise ValueError("stream=True takes one prompt with n=1")
            return self._stream(batch_ids[0], plist[0], kw)
        results = self._call(self._run_all(batch_ids, plist, kw))
        return results[0] if single and plist[0].n == 1 else results

    async def _run_all(self, batch_ids, plist, kw) -> list[dict]:
        async def one(ids, p):
            streams = await self.client.generate_n(ids, p, p.n, stream=False, **kw)
            return await asyncio.gather(*(_last(s) for s in streams))

        nested = await asyncio.gather(
            *(one(ids, p) for ids, p in zip(batch_ids, plist, strict=True))
        )
        return [_to_dict(c) for group in nested for c in group]

    def _stream(self, ids: list[int], params: SamplingParams, kw: dict) -> Iterator[dict]:
        q: queue.Queue = queue.Queue()
        done = object()

        async def pump():
            try:
                async for chunk in self.client.generate(ids, params, stream=True, **kw):
                    q.put(_to_dict(chunk))
            except Exception as e:  # handed to the consumer's thread
                q.put(e)
            finally:
                q.put(done)

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := q.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            fut.cancel()

    def flush_cache(self) -> bool:
        return self._call(self.client.flush_cache())

    def get_server_info(self) -> dict:
        stats = dict(vars(self.client.stats), time_detokenize_s=self.client.detokenize_s)
        return {"engine": vars(self.info), "stats": stats}

    def shutdown(self) -> None:
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            try:
                self._call(self.client.shutdown())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


async def _last(stream) -> GenerateChunk:
    """The final chunk, carrying the logprobs of every chunk before it."""
    last, lps = None, []
    async for chunk in stream:
        last = chunk
        lps.extend(chunk.logprobs)
    last.logprobs = lps
    return last


def _to_dict(c: GenerateChunk) -> dict:
    d = {"text": c.text, "output_ids": c.output_ids, "meta_info": c.meta_info(), "index": c.index}
    if c.logprobs:
        d["meta_info"]["output_token_logprobs"] = [(lp, t) for t, lp, _ in c.logprobs]
        d["meta_info"]["output_top_logprobs"] = [alts for _, _, alts in c.logprobs]
    return d
