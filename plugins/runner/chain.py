"""Running a prepared conf's plugins on one call: the request chain and the response hooks.

The request handlers run in conf order. A handler goes on (``None``), answers (a ``Stop``) or
raises; a plugin's own error answers with that error, any other exception answers 500 unless the
plugin's config says ``on_error: open``. Checks a handler deferred (``ctx.defer``) are awaited
before the request is forwarded or answered, and the first refusal among them comes ahead of
whatever a later plugin decided. When the chain ends in a Stop, earlier plugins undo what only a
forwarded request needs (``ctx.on_stop``: a quota reservation, say).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from deepgate.errors import DeepgateError, InternalError
from deepgate.flags import FLAGS
from plugins.base import RequestContext, ResponseContext, error_stop
from plugins.runner import codec
from plugins.runner.conf_cache import PreparedConf, PreparedPlugin

log = logging.getLogger(__name__)

InFlight = list[tuple[PreparedPlugin, Awaitable[None]]]


async def run_request_chain(
    ctx: RequestContext, conf: PreparedConf
) -> codec.Stop | codec.Rewrite | None:
    """The call's answer: a Stop, the Rewrite the chain amounts to, or ``None`` (go on)."""
    in_flight: InFlight = []
    try:
        stop = await _run_handlers(ctx, conf, in_flight)
    except (ConnectionError, TimeoutError):
        await _settle(ctx, in_flight)
        await _stopped(ctx)
        raise  # APISIX went away mid-call: nobody to answer
    except BaseException:
        await _settle(ctx, in_flight)  # nothing is left running unheard
        raise
    # A check an earlier plugin deferred decides first, as if it had waited for it.
    stop = await _settle(ctx, in_flight) or stop
    if stop is None:
        return ctx.rewrite()
    stop.headers = [*stop.headers, *ctx.rewrite_resp_headers]
    await _stopped(ctx)
    return stop


async def _run_handlers(
    ctx: RequestContext, conf: PreparedConf, in_flight: InFlight
) -> codec.Stop | None:
    """The chain's handlers in order, up to the first that stops the request."""
    flags_on = FLAGS.configured  # no flag file: no flag work at all
    for plugin in conf.plugins:
        handler = plugin.spec.on_request
        if handler is None:
            continue
        if flags_on:
            key = f"plugin.{plugin.spec.name}.enabled"
            # Only a flag the file names costs the APISIX round trips for the context.
            if FLAGS.defines(key) and not FLAGS.enabled(key, await ctx.flag_context(), True):
                log.debug("plugin %s switched off by its flag", plugin.spec.name)
                continue
        try:
            stop = await handler(ctx, plugin.config)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # noqa: BLE001 - _failed logs it with its traceback
            stop = _failed(ctx, plugin, exc)
            if stop is None:
                continue
        finally:
            if ctx.deferred:
                in_flight.extend((plugin, check) for check in ctx.deferred)
                ctx.deferred.clear()
        if stop is not None:
            return stop
    return None


async def _settle(ctx: RequestContext, in_flight: InFlight) -> codec.Stop | None:
    """Wait for every check the chain deferred; the answer to the first that refused."""
    refusal: codec.Stop | None = None
    for plugin, check in in_flight:
        try:
            await check
        except Exception as exc:  # noqa: BLE001 - _failed logs it with its traceback
            answer = _failed(ctx, plugin, exc)  # every failure logged, the first one answers
            refusal = refusal or answer
    in_flight.clear()
    return refusal


def _failed(ctx: RequestContext, plugin: PreparedPlugin, exc: Exception) -> codec.Stop | None:
    """What a plugin's exception (in its handler or a check it deferred) answers: its own error,
    a 500 when the plugin fails closed, nothing (go on) when it fails open."""
    if isinstance(exc, DeepgateError):
        return error_stop(exc, ctx.dialect)
    if _fails_open(plugin):
        log.error("plugin %s failed; on_error=open, going on", plugin.spec.name, exc_info=exc)
        return None
    log.error("plugin %s failed; answering 500", plugin.spec.name, exc_info=exc)
    return error_stop(_plugin_failure(ctx.request_id), ctx.dialect)


async def _stopped(ctx: RequestContext) -> None:
    """The chain ends early: let earlier plugins undo what only a forwarded request needs."""
    for undo in reversed(ctx.on_stop):
        try:
            await undo()
        except Exception:
            log.exception("undoing a plugin's work after a stop failed")


async def run_response_hooks(ctx: ResponseContext, conf: PreparedConf) -> None:
    """The response hooks in conf order; a failing one answers 500 unless it fails open."""
    for plugin in conf.plugins:
        hook = plugin.spec.on_response
        if hook is None:
            continue
        try:
            await hook(ctx, plugin.config)
        except (ConnectionError, TimeoutError):
            raise
        except Exception:
            if _fails_open(plugin):
                log.exception("response hook %s failed; on_error=open", plugin.spec.name)
                continue
            log.exception("response hook %s failed; answering 500", plugin.spec.name)
            stop = error_stop(_plugin_failure(None), "openai")
            ctx.new_status, ctx.new_headers, ctx.new_body = stop.status, stop.headers, stop.body
            return


def _fails_open(plugin: PreparedPlugin) -> bool:
    config: Any = plugin.config
    return getattr(config, "on_error", "closed") == "open"


def _plugin_failure(request_id: str | None) -> InternalError:
    ref = f" (request id {request_id})" if request_id else ""
    return InternalError(
        "The gateway could not check this request and refused it to stay safe. Retry; if it "
        f"keeps failing, give your operator the request id{ref}.",
        code="plugin_error",
    )
