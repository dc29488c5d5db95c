"""The model catalog: each provider's region, each target's context window and price.

One file (``deepgate/catalog.yaml``, or ``DEEPGATE_CATALOG``) that the policy plugin prices
requests with and the router chooses by. Targets are written ``provider:model`` as in route
chains; a target the catalog does not list has no known price (it costs 0 and the log says so
once) and an unknown context window (routing by size skips it).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from pydantic import Field

from deepgate.config import StrictModel, load_model

log = logging.getLogger(__name__)

DEFAULT_CATALOG = Path(__file__).with_name("catalog.yaml")
CATALOG_ENV = "DEEPGATE_CATALOG"


class ProviderInfo(StrictModel):
    region: str
    external: bool = True  # the provider is outside this deployment (personal-data rules)


class ModelInfo(StrictModel):
    context_window: int = Field(gt=0)
    input_per_mtok: float = Field(ge=0)  # USD per million prompt tokens
    output_per_mtok: float = Field(ge=0)  # USD per million completion tokens


class Catalog(StrictModel):
    providers: dict[str, ProviderInfo]
    models: dict[str, ModelInfo] = Field(default_factory=dict)

    def region(self, target: str) -> str | None:
        info = self.providers.get(target.partition(":")[0])
        return info.region if info else None

    def external(self, target: str) -> bool:
        info = self.providers.get(target.partition(":")[0])
        return info.external if info else True

    def context_window(self, target: str) -> int | None:
        info = self.models.get(target)
        return info.context_window if info else None

    def cost(self, target: str, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for a call with these token counts (0 for a target without a price)."""
        per_mtok_in, per_mtok_out = self.prices(target)
        return (prompt_tokens * per_mtok_in + completion_tokens * per_mtok_out) / 1_000_000

    def prices(self, target: str) -> tuple[float, float]:
        """(input, output) USD per million tokens; (0, 0) for a target without a price."""
        info = self.models.get(target)
        if info is None:
            _warn_unpriced(target)
            return 0.0, 0.0
        return info.input_per_mtok, info.output_per_mtok


@functools.cache
def _warn_unpriced(target: str) -> None:
    log.warning("the catalog has no price for %s; counting it as free", target)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The catalog at ``path``, else ``$DEEPGATE_CATALOG``, else the shipped one."""
    return load_model(path or os.environ.get(CATALOG_ENV) or DEFAULT_CATALOG, Catalog)
