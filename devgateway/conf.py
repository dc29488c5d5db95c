"""Reading APISIX's two files, and refusing whatever devgateway does not imitate.

``config.yaml`` and ``apisix.yaml`` are the files real APISIX loads. Both go through strict models
(unknown keys are errors) describing only what devgateway imitates; anything else stops start-up
with the file, the path inside it (``routes[2].plugins.limit-count``) and the name, because a
silently ignored plugin, option or key (an auth check, a limit, a header) would make local runs
lie about production. The checks APISIX itself makes are repeated: routes may use only plugins
listed in ``config.yaml``, ``apisix.yaml`` must end with ``#END``, and ``$env://NAME`` references
in plugin configurations are resolved from the environment (a missing variable is an error here,
where APISIX would only log it).
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deepgate.config import ConfigError, load_yaml
from devgateway import rewrite
from devgateway.expr import ExprError

EXT_PHASES = ("ext-plugin-pre-req", "ext-plugin-post-req", "ext-plugin-post-resp")
IMITATED_PLUGINS = ("client-control", "key-auth", "response-rewrite", *EXT_PHASES)
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE")
# nginx passes these to the runner whatever nginx_config.envs says (APISIX's nginx.conf template
# lists the first three with `env`; nginx keeps TZ on its own).
ALWAYS_PASSED_ENVS = ("PATH", "APISIX_PROFILE", "APISIX_DEPLOYMENT_ETCD_HOST", "TZ")
ENV_REF = "$env://"
_HINT = "Remove it, or run real APISIX (see docker/)."


# --- the models: what devgateway imitates, and nothing else ------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _NoNullPlugins(_Model):
    """A plugin written as ``name:`` with nothing after it is null in YAML, which APISIX refuses;
    without this check it would read as "plugin absent" and silently turn a check off."""

    @model_validator(mode="before")
    @classmethod
    def _no_null(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, conf in data.items():
                if conf is None:
                    raise ValueError(
                        f"plugin {name!r} has no configuration (null); write {{}} for its defaults"
                    )
        return data


# config.yaml


class ApisixSection(_Model):
    node_listen: int = Field(9080, ge=1, le=65535)
    enable_admin: Literal[False] = False


class RoleDataPlane(_Model):
    config_provider: Literal["yaml"]


class Deployment(_Model):
    role: Literal["data_plane"]
    role_data_plane: RoleDataPlane


class ExtPluginSection(_Model):
    cmd: list[str] | None = Field(None, min_length=1)
    path_for_test: str | None = None


class NginxConfig(_Model):
    envs: list[str] = Field(default_factory=list)


class ConfigYaml(_Model):
    apisix: ApisixSection = Field(default_factory=ApisixSection)
    deployment: Deployment
    plugins: list[str] | None = None
    ext_plugin: ExtPluginSection | None = Field(None, alias="ext-plugin")
    nginx_config: NginxConfig = Field(default_factory=NginxConfig)


# apisix.yaml: upstreams and consumers


class Timeout(_Model):
    connect: float = Field(gt=0)
    send: float = Field(gt=0)
    read: float = Field(gt=0)


class UpstreamModel(_Model):
    id: str | int | None = None
    name: str | None = None
    desc: str | None = None
    type: Literal["roundrobin"] = "roundrobin"
    scheme: Literal["http"] = "http"
    nodes: dict[str, int] = Field(min_length=1)
    timeout: Timeout | None = None
    pass_host: Literal["pass", "node", "rewrite"] = "pass"  # noqa: S105 - not a password
    upstream_host: str | None = None
    retries: int | None = Field(None, ge=0)


class ConsumerKeyAuth(_Model):
    key: str = Field(min_length=1)


class ConsumerPlugins(_NoNullPlugins):
    key_auth: ConsumerKeyAuth | None = Field(None, alias="key-auth")


class ConsumerModel(_Model):
    username: str = Field(pattern=r"^[a-zA-Z0-9_\-]+$")
    desc: str | None = None
    plugins: ConsumerPlugins = Field(default_factory=ConsumerPlugins)


# apisix.yaml: routes and their plugins


class ClientControl(_Model):
    max_body_size: int | None = Field(None, ge=0)


class KeyAuth(_Model):
    header: str = Field("apikey", min_length=1)
    query: str = Field("apikey", min_length=1)
    hide_credentials: bool = False


class ResponseRewrite(_Model):
    status_code: int | None = Field(None, ge=200, le=598)
    headers: dict[str, Any] | None = None
    body: str | None = None
    body_base64: bool = False
    vars: list[Any] | None = None


class ExtPluginEntry(_Model):
    name: str = Field(min_length=1, max_length=128)
    value: str


class ExtPluginConf(_Model):
    conf: list[ExtPluginEntry] | None = Field(None, min_length=1)
    allow_degradation: bool = False


class RoutePlugins(_NoNullPlugins):
    client_control: ClientControl | None = Field(None, alias="client-control")
    key_auth: KeyAuth | None = Field(None, alias="key-auth")
    response_rewrite: ResponseRewrite | None = Field(None, alias="response-rewrite")
    ext_plugin_pre_req: ExtPluginConf | None = Field(None, alias="ext-plugin-pre-req")
    ext_plugin_post_req: ExtPluginConf | None = Field(None, alias="ext-plugin-post-req")
    ext_plugin_post_resp: ExtPluginConf | None = Field(None, alias="ext-plugin-post-resp")

    def ext(self, phase: str) -> ExtPluginConf | None:
        conf: ExtPluginConf | None = getattr(self, phase.replace("-", "_"))
        return conf

    def names(self) -> list[str]:
        return [
            str(info.alias)
            for name, info in type(self).model_fields.items()
            if getattr(self, name) is not None
        ]


class RouteModel(_Model):
    id: str | int | None = None
    name: str | None = None
    desc: str | None = None
    uri: str | None = None
    uris: list[str] | None = Field(None, min_length=1)
    methods: list[Literal[METHODS]] | None = None  # type: ignore[valid-type]
    host: str | None = None
    hosts: list[str] | None = Field(None, min_length=1)
    priority: int = 0
    status: Literal[0, 1] = 1
    upstream_id: str | int | None = None
    upstream: UpstreamModel | None = None
    plugins: RoutePlugins = Field(default_factory=RoutePlugins)


class ApisixYaml(_Model):
    routes: list[RouteModel] = Field(default_factory=list)
    upstreams: list[UpstreamModel] = Field(default_factory=list)
    consumers: list[ConsumerModel] = Field(default_factory=list)


# --- what the gateway runs on -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    host: str
    port: int
    weight: int


@dataclass(frozen=True, slots=True)
class Upstream:
    key: str  # "upstreams[0]" or "routes[3].upstream": the balancer's state is per upstream
    nodes: tuple[Node, ...]
    connect_s: float = 60.0  # nginx's proxy_*_timeout defaults
    send_s: float = 60.0
    read_s: float = 60.0
    pass_host: str = "pass"  # noqa: S105 - APISIX's default: pass the client's Host
    upstream_host: str | None = None
    retries: int = 0


@dataclass(frozen=True, slots=True)
class Route:
    id: str
    index: int
    uris: tuple[str, ...]
    methods: tuple[str, ...]
    hosts: tuple[str, ...]
    priority: int
    upstream: Upstream
    plugins: RoutePlugins
    rewrite: rewrite.Rule | None = None
    name: str | None = None


@dataclass
class GatewayConfig:
    listen_port: int
    runner_cmd: list[str] | None
    runner_socket: str | None  # ext-plugin.path_for_test
    envs: list[str]
    routes: list[Route]
    consumers: dict[str, str] = field(default_factory=dict)  # key -> username
    warnings: list[str] = field(default_factory=list)

    def runner_env_names(self) -> list[str]:
        return list(dict.fromkeys([*self.envs, *ALWAYS_PASSED_ENVS]))


# --- errors that name the file, the path and the name -----------------------------------------


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _unwrap(tp: Any) -> Any:
    """The model or container inside ``X | None``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if args else tp
    return tp


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping found at ``loc``."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            if get_origin(tp) is not list:
                return None
            tp = get_args(tp)[0]
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            found = [f for n, f in tp.model_fields.items() if part in (n, f.alias) and f.annotation]
            if not found:
                return None
            tp = found[0].annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _known_keys(model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    return ", ".join(names)


def _describe(file: Path, root: type[BaseModel], err: ValidationError) -> list[str]:
    lines = []
    for item in err.errors(include_input=False, include_url=False):
        loc = tuple(item["loc"])
        where = f"{file}: {_path(loc)}"
        if item["type"] == "extra_forbidden" and loc:
            name, parent = loc[-1], loc[:-1]
            known = _known_keys(_model_at(root, parent))
            if parent and parent[-1] == "plugins":
                what = f"unsupported plugin {name!r}: devgateway imitates only {known}"
            elif len(parent) >= 2 and parent[-2] == "plugins":
                what = f"unsupported option {name!r} of {parent[-1]}: devgateway imitates {known}"
            else:
                what = f"unsupported key {name!r}: devgateway imitates only {known} here"
            lines.append(f"{where}: {what}. {_HINT}")
        elif item["type"] == "literal_error":
            lines.append(f"{where}: {item['msg']} (the values devgateway accepts here)")
        else:
            lines.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
    return lines


def _fail(problems: list[str]) -> ConfigError:
    return ConfigError("\n".join(problems))


# --- $env:// references ---------------------------------------------------------------------


def _resolve_refs(value: Any, file: Path, path: str, problems: list[str]) -> Any:
    """``value`` with every ``$env://NAME`` string replaced by the variable's value."""
    if isinstance(value, dict):
        return {k: _resolve_refs(v, file, f"{path}.{k}", problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, file, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("$secret://"):
        problems.append(
            f"{file}: {path}: $secret:// references (a secret manager) are not "
            f"imitated by devgateway; use $env://NAME. {_HINT}"
        )
        return value
    if not isinstance(value, str) or not value.startswith(ENV_REF):
        return value
    name = value[len(ENV_REF) :]
    if not name or "/" in name:
        problems.append(f"{file}: {path}: {value!r}: devgateway resolves only $env://NAME")
        return value
    found = os.environ.get(name)
    if not found:
        problems.append(
            f"{file}: {path}: the environment variable {name} (named by {value}) is not set"
        )
        return value
    return found


def _resolve_plugin_refs(doc: Any, file: Path, problems: list[str]) -> Any:
    if not isinstance(doc, dict):
        return doc
    out = dict(doc)
    for section in ("routes", "consumers"):
        items = out.get(section)
        if not isinstance(items, list):
            continue
        resolved = []
        for i, item in enumerate(items):
            if isinstance(item, dict) and "plugins" in item:
                item = dict(item)
                item["plugins"] = _resolve_refs(
                    item["plugins"], file, f"{section}[{i}].plugins", problems
                )
            resolved.append(item)
        out[section] = resolved
    return out


# --- building the runtime objects -------------------------------------------------------------


def _node(addr: str, weight: int, file: Path, path: str, problems: list[str]) -> Node | None:
    host, sep, port = addr.rpartition(":")
    if not sep or host.endswith(":") or (addr.startswith("[") and not host.endswith("]")):
        host, port = addr, "80"  # no port: APISIX uses the scheme's default
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"{file}: {path}: {addr!r} is not host:port")
        return None
    if weight < 0:
        problems.append(f"{file}: {path}: a weight cannot be negative")
        return None
    return Node(host, int(port), weight)


def _upstream(model: UpstreamModel, key: str, file: Path, problems: list[str]) -> Upstream:
    nodes = [
        _node(addr, weight, file, f"{key}.nodes.{addr}", problems)
        for addr, weight in model.nodes.items()
    ]
    live = tuple(n for n in nodes if n is not None and n.weight > 0)
    if not live and all(n is not None for n in nodes):
        problems.append(f"{file}: {key}.nodes: every node has weight 0; nothing could serve")
    if model.pass_host == "rewrite" and not model.upstream_host:  # noqa: S105
        problems.append(f"{file}: {key}.upstream_host: pass_host rewrite needs upstream_host")
    t = model.timeout
    return Upstream(
        key=key,
        nodes=live,
        connect_s=t.connect if t else 60.0,
        send_s=t.send if t else 60.0,
        read_s=t.read if t else 60.0,
        pass_host=model.pass_host,
        upstream_host=model.upstream_host,
        # APISIX's default: try each other node once when one cannot be reached.
        retries=model.retries if model.retries is not None else max(len(live) - 1, 0),
    )


def _check_uri(uri: str, file: Path, path: str, problems: list[str]) -> None:
    if not uri.startswith("/"):
        problems.append(f"{file}: {path}: {uri!r} must start with /")
    elif "*" in uri[:-1] or "/:" in uri:
        problems.append(
            f"{file}: {path}: {uri!r}: devgateway imitates exact paths and a trailing * "
            f"(prefix) only, not parameters or inner wildcards. {_HINT}"
        )


def _check_host(host: str, file: Path, path: str, problems: list[str]) -> None:
    bare = host[1:] if host.startswith("*") else host
    if not bare or "*" in bare:
        problems.append(f"{file}: {path}: {host!r}: only a leading * wildcard is allowed")


def _routes(
    doc: ApisixYaml,
    upstreams: dict[str, Upstream],
    enabled: set[str],
    cfile: Path,
    rfile: Path,
    problems: list[str],
    warnings: list[str],
) -> list[Route]:
    routes: list[Route] = []
    seen: set[str] = set()
    for i, r in enumerate(doc.routes):
        path = f"routes[{i}]"
        rid = str(r.id) if r.id is not None else str(i)
        if rid in seen:
            problems.append(f"{rfile}: {path}.id: another route has id {rid!r}")
        seen.add(rid)
        if (r.uri is None) == (r.uris is None):
            problems.append(f"{rfile}: {path}: give exactly one of uri and uris")
        uris = [r.uri] if r.uri is not None else list(r.uris or [])
        for j, uri in enumerate(uris):
            _check_uri(uri, rfile, f"{path}.uri" if r.uri else f"{path}.uris[{j}]", problems)
        if r.host is not None and r.hosts is not None:
            problems.append(f"{rfile}: {path}: give host or hosts, not both")
        hosts = [r.host] if r.host is not None else list(r.hosts or [])
        for host in hosts:
            _check_host(host, rfile, f"{path}.hosts", problems)
        for name in r.plugins.names():
            if name not in enabled:
                problems.append(
                    f"{rfile}: {path}.plugins.{name}: plugin {name!r} is not in the plugins list "
                    f"of {cfile}; APISIX runs only the plugins listed there"
                )
        rule = None
        if r.plugins.response_rewrite is not None:
            try:
                rule = rewrite.compile_rule(r.plugins.response_rewrite)
            except (ValueError, ExprError) as exc:
                problems.append(f"{rfile}: {path}.plugins.response-rewrite: {exc}")
            else:
                warnings.extend(
                    f"{rfile}: {path}.plugins.response-rewrite.vars: {w}" for w in rule.warnings
                )
        if r.upstream is not None and r.upstream_id is not None:
            problems.append(f"{rfile}: {path}: give upstream or upstream_id, not both")
        if r.upstream is not None:
            upstream = _upstream(r.upstream, f"{path}.upstream", rfile, problems)
        elif r.upstream_id is not None and str(r.upstream_id) in upstreams:
            upstream = upstreams[str(r.upstream_id)]
        else:
            if r.upstream_id is None:
                problems.append(f"{rfile}: {path}: a route needs upstream or upstream_id")
            else:
                problems.append(f"{rfile}: {path}.upstream_id: no upstream {r.upstream_id!r}")
            continue
        if r.status == 0:
            continue  # a disabled route takes no traffic
        routes.append(
            Route(
                id=rid,
                index=i,
                uris=tuple(uris),
                methods=tuple(r.methods or ()),
                hosts=tuple(hosts),
                priority=r.priority,
                upstream=upstream,
                plugins=r.plugins,
                rewrite=rule,
                name=r.name,
            )
        )
    return routes


def _consumers(
    doc: ApisixYaml, enabled: set[str], cfile: Path, rfile: Path, problems: list[str]
) -> dict[str, str]:
    consumers: dict[str, str] = {}
    names: set[str] = set()
    for i, c in enumerate(doc.consumers):
        path = f"consumers[{i}]"
        if c.username in names:
            problems.append(f"{rfile}: {path}.username: another consumer is {c.username!r}")
        names.add(c.username)
        auth = c.plugins.key_auth
        if auth is None:
            continue
        if "key-auth" not in enabled:
            problems.append(
                f"{rfile}: {path}.plugins.key-auth: plugin 'key-auth' is not in the plugins "
                f"list of {cfile}"
            )
        if auth.key in consumers:
            problems.append(
                f"{rfile}: {path}.plugins.key-auth.key: consumer {consumers[auth.key]!r} has the "
                "same key; a key must name one consumer"
            )
        consumers[auth.key] = c.username
    return consumers


def _read_config(cfile: Path) -> ConfigYaml:
    raw = load_yaml(cfile)
    try:
        return ConfigYaml.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        raise _fail(_describe(cfile, ConfigYaml, err)) from None


def _read_routes(rfile: Path) -> Any:
    try:
        text = rfile.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{rfile}: cannot read the file ({exc.strerror})") from None
    if not text.rstrip().endswith("#END"):
        raise ConfigError(
            f"{rfile}: APISIX standalone files must end with a '#END' line (APISIX would keep "
            "waiting for the rest of the file)"
        )
    if "${{" in text:
        raise ConfigError(
            f"{rfile}: ${{{{VAR}}}} substitution is not imitated by devgateway; use $env://NAME "
            f"in plugin configurations. {_HINT}"
        )
    return load_yaml(rfile)


def load(config_file: str | Path, routes_file: str | Path) -> GatewayConfig:
    """Both files, checked as APISIX checks them and for what devgateway imitates."""
    cfile, rfile = Path(config_file), Path(routes_file)
    config = _read_config(cfile)
    problems: list[str] = []
    warnings: list[str] = []
    enabled: set[str] = set(IMITATED_PLUGINS) if config.plugins is None else set()
    for i, name in enumerate(config.plugins or []):
        if name not in IMITATED_PLUGINS:
            problems.append(
                f"{cfile}: plugins[{i}]: unsupported plugin {name!r}: devgateway imitates only "
                f"{', '.join(IMITATED_PLUGINS)}. {_HINT}"
            )
        enabled.add(name)
    ext = config.ext_plugin
    if ext is not None and ext.cmd is None and ext.path_for_test is None:
        problems.append(f"{cfile}: ext-plugin: give cmd (spawn the runner) or path_for_test")

    raw = _resolve_plugin_refs(_read_routes(rfile), rfile, problems)
    try:
        doc = ApisixYaml.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        raise _fail(problems + _describe(rfile, ApisixYaml, err)) from None

    upstreams: dict[str, Upstream] = {}
    for i, up in enumerate(doc.upstreams):
        key = str(up.id) if up.id is not None else None
        if key is None:
            problems.append(f"{rfile}: upstreams[{i}].id: an upstream in the list needs an id")
            continue
        if key in upstreams:
            problems.append(f"{rfile}: upstreams[{i}].id: another upstream has id {key!r}")
        upstreams[key] = _upstream(up, f"upstreams[{i}]", rfile, problems)
    routes = _routes(doc, upstreams, enabled, cfile, rfile, problems, warnings)
    consumers = _consumers(doc, enabled, cfile, rfile, problems)
    if problems:
        raise _fail(problems)
    if ext is None and any(r.plugins.ext(p) for r in routes for p in EXT_PHASES):
        warnings.append(
            f"{cfile}: no ext-plugin section: routes with ext-plugin phases will answer 503"
        )
    return GatewayConfig(
        listen_port=config.apisix.node_listen,
        runner_cmd=list(ext.cmd) if ext and ext.cmd else None,
        runner_socket=ext.path_for_test if ext else None,
        envs=list(config.nginx_config.envs),
        routes=routes,
        consumers=consumers,
        warnings=warnings,
    )
