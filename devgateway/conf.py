"""Reading APISIX's two files, and refusing whatever the stand-in does not imitate.

``config.yaml`` and ``apisix.yaml`` are the files real APISIX loads. The stand-in understands the
keys, plugins and options deepgate's configs use; anything else stops start-up with the file,
the path inside it and the name, because silently ignoring a plugin (an auth check, a limit)
would make local runs lie about production.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepgate.config import ConfigError, load_yaml

EXT_PHASES = ("ext-plugin-pre-req", "ext-plugin-post-req", "ext-plugin-post-resp")
IMITATED_PLUGINS = ("client-control", "key-auth", "response-rewrite", *EXT_PHASES)
_PLUGIN_OPTIONS: dict[str, set[str]] = {
    "client-control": {"max_body_size"},
    "key-auth": {"header", "query", "hide_credentials"},
    "response-rewrite": {"vars", "status_code", "headers", "body", "body_base64"},
    **{phase: {"conf", "allow_degradation"} for phase in EXT_PHASES},
}


@dataclass
class Upstream:
    id: str
    nodes: list[tuple[str, int, int]]  # host, port, weight
    connect_s: float = 6.0
    send_s: float = 6.0
    read_s: float = 6.0


@dataclass
class Route:
    id: str
    uris: list[str]
    methods: list[str]
    hosts: list[str]
    priority: int
    upstream: Upstream
    plugins: dict[str, dict[str, Any]]
    index: int = 0


@dataclass
class GatewayConfig:
    listen_port: int
    runner_cmd: list[str] | None
    runner_socket: str | None  # ext-plugin.path_for_test
    envs: list[str]
    routes: list[Route]
    consumers: dict[str, str] = field(default_factory=dict)  # key -> username


def _only(
    value: Any, allowed: set[str], file: Path, path: str, what: str = "key"
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: {path}: expected a mapping")
    for key in value:
        if key not in allowed:
            raise ConfigError(
                f"{file}: {path}.{key}: unsupported {what} {key!r}: devgateway imitates only "
                f"{', '.join(sorted(allowed))} here. Remove it, or run real APISIX (see docker/)."
            )
    return value


def resolve_env(value: str, file: Path, path: str) -> str:
    if not value.startswith("$env://"):
        return value
    name = value.removeprefix("$env://")
    found = os.environ.get(name)
    if not found:
        raise ConfigError(f"{file}: {path}: the environment variable {name} is not set")
    return found


def _config_yaml(file: Path) -> tuple[int, list[str] | None, str | None, list[str], set[str]]:
    doc = _only(
        load_yaml(file),
        {"apisix", "deployment", "plugins", "ext-plugin", "nginx_config"},
        file,
        "(top)",
    )
    apisix = _only(doc.get("apisix", {}), {"node_listen", "enable_admin"}, file, "apisix")
    if apisix.get("enable_admin"):
        raise ConfigError(f"{file}: apisix.enable_admin: devgateway has no Admin API; set false")
    deployment = _only(doc.get("deployment", {}), {"role", "role_data_plane"}, file, "deployment")
    provider = (deployment.get("role_data_plane") or {}).get("config_provider", "yaml")
    if provider != "yaml":
        raise ConfigError(f"{file}: deployment.role_data_plane.config_provider: only yaml")
    plugins = doc.get("plugins", list(IMITATED_PLUGINS))
    for i, name in enumerate(plugins):
        if name not in IMITATED_PLUGINS:
            raise ConfigError(
                f"{file}: plugins[{i}]: unsupported plugin {name!r}: devgateway imitates "
                f"{', '.join(IMITATED_PLUGINS)}"
            )
    ext = _only(doc.get("ext-plugin", {}), {"cmd", "path_for_test"}, file, "ext-plugin")
    nginx = _only(doc.get("nginx_config", {}), {"envs"}, file, "nginx_config")
    return (
        int(apisix.get("node_listen", 9080)),
        list(ext["cmd"]) if ext.get("cmd") else None,
        ext.get("path_for_test"),
        list(nginx.get("envs") or []),
        set(plugins),
    )


def _upstream(raw: Any, file: Path, path: str) -> Upstream:
    up = _only(raw, {"id", "name", "type", "scheme", "nodes", "timeout"}, file, path)
    if up.get("type", "roundrobin") != "roundrobin" or up.get("scheme", "http") != "http":
        raise ConfigError(f"{file}: {path}: only type roundrobin and scheme http are imitated")
    nodes = []
    for addr, weight in (up.get("nodes") or {}).items():
        host, _, port = str(addr).rpartition(":")
        nodes.append((host, int(port), int(weight)))
    if not nodes:
        raise ConfigError(f"{file}: {path}.nodes: an upstream needs at least one node")
    timeout = _only(up.get("timeout", {}), {"connect", "send", "read"}, file, f"{path}.timeout")
    return Upstream(
        id=str(up.get("id", path)),
        nodes=nodes,
        connect_s=float(timeout.get("connect", 6)),
        send_s=float(timeout.get("send", 6)),
        read_s=float(timeout.get("read", 6)),
    )


def load(config_file: str | Path, routes_file: str | Path) -> GatewayConfig:
    cfile, rfile = Path(config_file), Path(routes_file)
    port, cmd, sock, envs, enabled = _config_yaml(cfile)
    text = rfile.read_text(encoding="utf-8")
    if not text.rstrip().endswith("#END"):
        raise ConfigError(f"{rfile}: APISIX standalone files must end with a '#END' line")
    doc = _only(load_yaml(rfile), {"upstreams", "consumers", "routes"}, rfile, "(top)")
    upstreams = {}
    for i, raw in enumerate(doc.get("upstreams") or []):
        up = _upstream(raw, rfile, f"upstreams[{i}]")
        upstreams[up.id] = up
    consumers = {}
    for i, raw in enumerate(doc.get("consumers") or []):
        path = f"consumers[{i}]"
        consumer = _only(raw, {"username", "plugins"}, rfile, path)
        plugins = _only(
            consumer.get("plugins", {}), {"key-auth"}, rfile, f"{path}.plugins", "plugin"
        )
        key_auth = _only(plugins.get("key-auth", {}), {"key"}, rfile, f"{path}.plugins.key-auth")
        if "key" in key_auth:
            key = resolve_env(str(key_auth["key"]), rfile, f"{path}.plugins.key-auth.key")
            consumers[key] = str(consumer["username"])
    routes = []
    allowed = {"id", "name", "uri", "uris", "methods", "host", "hosts", "priority", "plugins"}
    for i, raw in enumerate(doc.get("routes") or []):
        path = f"routes[{i}]"
        r = _only(raw, allowed | {"upstream_id", "upstream"}, rfile, path)
        plugins = _only(
            r.get("plugins", {}),
            enabled & set(IMITATED_PLUGINS),
            rfile,
            f"{path}.plugins",
            "plugin",
        )
        for name, options in plugins.items():
            _only(options or {}, _PLUGIN_OPTIONS[name], rfile, f"{path}.plugins.{name}", "option")
        if "upstream_id" in r:
            if r["upstream_id"] not in upstreams:
                raise ConfigError(f"{rfile}: {path}.upstream_id: no upstream {r['upstream_id']!r}")
            upstream = upstreams[r["upstream_id"]]
        else:
            upstream = _upstream(r.get("upstream"), rfile, f"{path}.upstream")
        hosts = r.get("hosts") or ([r["host"]] if r.get("host") else [])
        routes.append(
            Route(
                id=str(r.get("id", i)),
                uris=list(r.get("uris") or [r["uri"]]),
                methods=[m.upper() for m in r.get("methods") or []],
                hosts=[h.lower() for h in hosts],
                priority=int(r.get("priority", 0)),
                upstream=upstream,
                plugins={k: dict(v or {}) for k, v in plugins.items()},
                index=i,
            )
        )
    return GatewayConfig(port, cmd, sock, envs, routes, consumers)
