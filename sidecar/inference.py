"""What the faces ask of the inference pool: embeddings and safety scores.

The HTTP face (``/v1/embeddings``) and the gRPC face (``Embed``, ``Classify``) call an
``Inference``. In roles ``pool`` and ``all`` it is ``LocalInference``: the models run in this
process behind the micro-batcher. In role ``gateway`` with pool addresses in the config it is
``RemoteInference``: the work goes over gRPC to the pool replicas, balanced on their queue depth.
Without either, the faces answer that no pool serves this request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from deepgate.errors import InvalidRequest, NotFound


@dataclass(slots=True)
class Embeddings:
    model: str
    vectors: list[list[float]]
    prompt_tokens: int


class Inference(Protocol):
    def embedding_models(self) -> list[str]: ...

    def classifier_models(self) -> list[str]: ...

    async def embed(self, model: str, inputs: list[str], deadline: float | None) -> Embeddings: ...

    async def classify(
        self, model: str, texts: list[str], deadline: float | None
    ) -> list[dict[str, float]]: ...

    async def queue_depth(self) -> int: ...


MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request


def check_inputs(inputs: list[str], what: str = "input") -> None:
    if not inputs:
        raise InvalidRequest(f"'{what}' must not be empty.", param=what)
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequest(f"At most {MAX_INPUTS} items per request.", param=what)
    if not all(isinstance(i, str) for i in inputs):
        raise InvalidRequest(f"'{what}' must be a string or an array of strings.", param=what)


@dataclass
class LocalInference:
    """The models in this process, behind the batcher (``sidecar.pool.batcher.Pool``)."""

    pool: Any  # sidecar.pool.batcher.Pool; typed loosely so this module never imports torch
    embedder: Any  # sidecar.pool.embeddings.EmbeddingModel (for token counts)
    embedding: list[str] = field(default_factory=list)
    classifiers: list[str] = field(default_factory=list)

    def embedding_models(self) -> list[str]:
        return list(self.embedding)

    def classifier_models(self) -> list[str]:
        return list(self.classifiers)

    def _known(self, model: str, names: list[str], what: str) -> None:
        if model not in names:
            raise NotFound(
                f"The {what} model {model!r} is not served here. Use one of: {', '.join(names)}.",
                param="model",
                code="model_not_found",
            )

    async def embed(self, model: str, inputs: list[str], deadline: float | None) -> Embeddings:
        self._known(model, self.embedding, "embedding")
        check_inputs(inputs)
        vectors = await self.pool.submit(model, inputs, deadline)
        tokens = await asyncio.to_thread(self.embedder.count_tokens, inputs)
        return Embeddings(model, vectors, int(tokens))

    async def classify(
        self, model: str, texts: list[str], deadline: float | None
    ) -> list[dict[str, float]]:
        self._known(model, self.classifiers, "classifier")
        check_inputs(texts, "texts")
        return list(await self.pool.submit(model, texts, deadline))

    async def queue_depth(self) -> int:
        return int(sum(self.pool.queue_depths().values()))
