"""``deepgate-auth-bridge``: let both official SDKs authenticate through APISIX unchanged.

The OpenAI SDK sends its key as ``Authorization: Bearer <key>``, the Anthropic SDK as
``x-api-key: <key>``, while APISIX's ``key-auth`` reads one named header verbatim. Running in
``ext-plugin-pre-req`` (before ``key-auth``), this plugin moves whichever credential came into the
header ``key-auth`` reads (``apikey`` by default) and removes the originals, so that with
``key-auth``'s ``hide_credentials`` no client key reaches the upstream. It checks nothing itself:
authentication stays APISIX's.
"""

from __future__ import annotations

from pydantic import Field

from plugins.base import PluginConfig, PluginSpec, RequestContext
from plugins.runner.codec import Stop

NAME = "deepgate-auth-bridge"

_BEARER = "bearer "


class Config(PluginConfig):
    header: str = Field(default="apikey", min_length=1, pattern=r"^[A-Za-z0-9-]+$")
    # Where clients put their key, in order of preference.
    sources: list[str] = Field(default_factory=lambda: ["authorization", "x-api-key"], min_length=1)


def credential(ctx: RequestContext, source: str) -> str | None:
    value = ctx.header(source)
    if not value:
        return None
    if source == "authorization":
        # Only a Bearer token is a key; other schemes are not ours to move.
        if not value.lower().startswith(_BEARER):
            return None
        value = value[len(_BEARER) :]
    return value.strip() or None


async def on_request(ctx: RequestContext, conf: Config) -> Stop | None:
    if ctx.header(conf.header):
        key = None  # the client already used key-auth's own header
    else:
        key = next((k for k in (credential(ctx, s) for s in conf.sources) if k), None)
    if key is not None:
        ctx.set_header(conf.header, key)
    for source in conf.sources:
        if ctx.header(source) is not None:
            ctx.set_header(source, None)  # no client credential travels further
    return None


SPEC = PluginSpec(name=NAME, config=Config, on_request=on_request)
