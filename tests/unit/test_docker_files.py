"""docker/: offline checks of the Dockerfiles and compose file (no Docker engine needed).

They hold the images to the repository: every file they copy exists, base images are pinned,
the sidecar listens where apisix-conf/apisix.yaml sends traffic, and APISIX finds the runner that
apisix-conf/config.yaml names.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
APISIX_CONF = "/usr/local/apisix/conf"
SERVICES = ("apisix", "sidecar", "redis")


# --- helpers -----------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, f"{dockerfile.name} ends inside a continued line"
    return out


def copies(dockerfile: Path) -> list[tuple[list[str], str, dict[str, str]]]:
    """(sources, destination, flags) for each COPY/ADD."""
    out = []
    for word, args in instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        tokens = shlex.split(args)
        flags = {}
        while tokens and tokens[0].startswith("--"):
            name, _, value = tokens.pop(0)[2:].partition("=")
            flags[name] = value
        if tokens and tokens[0].startswith("["):
            tokens = json.loads(" ".join(tokens))
        assert len(tokens) >= 2, f"{dockerfile.name}: {word} {args}"
        out.append((tokens[:-1], tokens[-1], flags))
    return out


def from_images(dockerfile: Path) -> list[str]:
    """The images the stages start from (stage names used as bases left out)."""
    stages: set[str] = set()
    images = []
    for word, args in instructions(dockerfile):
        if word != "FROM":
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        if len(parts) == 3 and parts[1].lower() == "as":
            stages.add(parts[2].lower())
        if parts[0].lower() not in stages:
            images.append(parts[0])
    return images


def exec_form(dockerfile: Path, word: str) -> list[str]:
    """The last WORD instruction's exec (JSON) form."""
    found = [args for w, args in instructions(dockerfile) if w == word]
    assert found, f"{dockerfile.name} has no {word}"
    value = json.loads(found[-1])
    assert isinstance(value, list)
    return [str(v) for v in value]


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    svc = compose["services"][name]
    assert isinstance(svc, dict)
    return svc


def build_of(compose: dict[str, Any], name: str) -> tuple[Path, Path]:
    """(build context, Dockerfile) of a compose service, as paths on this machine."""
    build = service(compose, name)["build"]
    context = (DOCKER / build["context"]).resolve()
    return context, (context / build["dockerfile"]).resolve()


def environment(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment", {})
    if isinstance(env, dict):
        return {k: None if v is None else str(v) for k, v in env.items()}
    return {k: (v if sep else None) for k, sep, v in (str(e).partition("=") for e in env)}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_has_the_three_services(compose: dict[str, Any]) -> None:
    assert set(SERVICES) <= set(compose["services"])


@pytest.mark.parametrize("name", ["apisix", "sidecar"])
def test_compose_builds_from_the_repository_root(compose: dict[str, Any], name: str) -> None:
    context, dockerfile = build_of(compose, name)
    assert context == ROOT
    assert dockerfile == DOCKER / f"{name}.Dockerfile"
    assert dockerfile.is_file()


def test_apisix_mounts_exactly_the_two_apisix_conf_files(compose: dict[str, Any]) -> None:
    volumes = service(compose, "apisix")["volumes"]
    mounts = {}
    for volume in volumes:
        source, target, *mode = str(volume).split(":")
        assert mode == ["ro"], f"{volume} should be read-only"
        host = (DOCKER / source).resolve()
        assert host.is_file(), f"{volume}: {host} does not exist"
        mounts[target] = host
    assert mounts == {
        f"{APISIX_CONF}/config.yaml": ROOT / "apisix-conf" / "config.yaml",
        f"{APISIX_CONF}/apisix.yaml": ROOT / "apisix-conf" / "apisix.yaml",
    }


def test_apisix_requires_the_demo_key_and_publishes_9080(compose: dict[str, Any]) -> None:
    apisix = service(compose, "apisix")
    env = environment(apisix)
    assert env["DEEPGATE_DEMO_KEY"] == "${DEEPGATE_DEMO_KEY:?set DEEPGATE_DEMO_KEY}"
    assert "DEEPGATE_LOG_LEVEL" in env
    assert env.get("APISIX_STAND_ALONE") == "true"
    assert [str(p) for p in apisix["ports"]] == ["9080:9080"]
    conf = load(ROOT / "apisix-conf" / "config.yaml")
    assert conf["apisix"]["node_listen"] == 9080
    # everything APISIX passes to its workers and the runner is something compose can set
    assert {"DEEPGATE_DEMO_KEY", "DEEPGATE_LOG_LEVEL"} <= set(conf["nginx_config"]["envs"])


def test_sidecar_shares_the_apisix_network_namespace(compose: dict[str, Any]) -> None:
    sidecar = service(compose, "sidecar")
    assert sidecar["network_mode"] == "service:apisix"
    assert "ports" not in sidecar  # not allowed with network_mode: published on apisix
    env = environment(sidecar)
    for provider in ("DEEPSEEK", "OPENAI", "ANTHROPIC"):
        assert f"{provider}_API_KEY" in env
        assert f"{provider}_BASE_URL" in env
    assert "healthcheck" in sidecar


def test_redis_uses_a_pinned_official_image(compose: dict[str, Any]) -> None:
    image = service(compose, "redis")["image"]
    assert re.fullmatch(r"redis:7(\.\d+)*(-[a-z0-9]+)?", image), image


# --- the Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["apisix", "sidecar"])
def test_every_copied_path_exists(compose: dict[str, Any], name: str) -> None:
    context, dockerfile = build_of(compose, name)
    checked = 0
    for sources, _dest, flags in copies(dockerfile):
        if "from" in flags:
            continue  # from another stage, not the build context
        for source in sources:
            assert not source.startswith(("http://", "https://")), source
            matches = list(context.glob(source.rstrip("/"))) if "*" in source else []
            assert (context / source).exists() or matches, f"{dockerfile.name}: COPY {source}"
            checked += 1
    assert checked


@pytest.mark.parametrize("name", ["apisix", "sidecar"])
def test_the_dockerignore_lets_every_copied_path_through(name: str) -> None:
    dockerfile = DOCKER / f"{name}.Dockerfile"
    ignore = Path(f"{dockerfile}.dockerignore")
    lines = [ln.strip() for ln in ignore.read_text().splitlines()]
    assert "*" in lines  # an allowlist: the context is the repository root, .venv included
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for sources, _dest, flags in copies(dockerfile):
        if "from" in flags:
            continue
        for source in sources:
            path = PurePosixPath(source.rstrip("/"))
            assert {str(path), *map(str, path.parents)} & allowed, f"{ignore.name}: {source}"


@pytest.mark.parametrize("name", ["apisix", "sidecar"])
def test_base_images_are_pinned(name: str) -> None:
    images = from_images(DOCKER / f"{name}.Dockerfile")
    assert images
    for image in images:
        _repo, sep, tag = image.rpartition(":")
        assert sep, f"{image} has no tag"
        assert "/" not in tag, f"{image} has no tag"
        assert tag != "latest", image
        assert not tag.startswith("latest-"), image
        assert re.match(r"\d", tag), f"{image}: pin a version"


def test_apisix_image_is_apisix_3_6_or_later_on_debian() -> None:
    (image,) = from_images(DOCKER / "apisix.Dockerfile")
    found = re.fullmatch(r"apache/apisix:(\d+)\.(\d+)\.(\d+)-debian", image)
    assert found, image
    major, minor = int(found[1]), int(found[2])
    assert major == 3, image
    assert minor >= 6, image


def test_apisix_image_carries_the_config_and_runs_as_apisix() -> None:
    dockerfile = DOCKER / "apisix.Dockerfile"
    targets = {dest for _src, dest, _flags in copies(dockerfile)}
    assert {f"{APISIX_CONF}/config.yaml", f"{APISIX_CONF}/apisix.yaml"} <= targets
    steps = instructions(dockerfile)
    users = [args for word, args in steps if word == "USER"]
    assert users[-1] == "apisix"
    # the image's own entrypoint (standalone checks, apisix init, openresty) is kept
    assert not [word for word, _ in steps if word in ("ENTRYPOINT", "CMD")]


def test_the_runner_apisix_starts_is_the_one_the_image_installs() -> None:
    conf = load(ROOT / "apisix-conf" / "config.yaml")
    cmd = conf["ext-plugin"]["cmd"]
    name = cmd[0]
    assert "/" not in name  # found on the PATH ...
    assert "PATH" in conf["nginx_config"]["envs"]  # ... which nginx passes on to the runner
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert name in scripts
    runs = " ".join(
        args for word, args in instructions(DOCKER / "apisix.Dockerfile") if word == "RUN"
    )
    links = re.findall(r"ln -s\S* (\S+) (\S+?);?(?=\s|$)", runs)
    assert links, "the APISIX Dockerfile makes no symlink"
    by_link = {PurePosixPath(link): PurePosixPath(target) for target, link in links}
    link = PurePosixPath("/usr/local/bin") / name
    assert link in by_link, f"no {link} in {sorted(map(str, by_link))}"
    assert by_link[link] == PurePosixPath("/opt/deepgate/.venv/bin") / name


def test_sidecar_listens_where_the_routes_send_traffic() -> None:
    cmd = exec_form(DOCKER / "sidecar.Dockerfile", "CMD")
    assert cmd[0] == "deepgate-sidecar"
    assert option(cmd, "--role") == "gateway"
    http_port = port_of(option(cmd, "--http"))
    routes = load(ROOT / "apisix-conf" / "apisix.yaml")
    upstreams = {u["id"]: u for u in routes["upstreams"]}
    used = {r["upstream_id"] for r in routes["routes"]}
    assert used
    for upstream_id in used:
        nodes = list(upstreams[upstream_id]["nodes"])
        assert nodes
        for node in nodes:
            # 127.0.0.1: the sidecar shares APISIX's network namespace (pod / network_mode)
            assert node == f"127.0.0.1:{http_port}", f"upstream {upstream_id}: {node}"
    exposed = " ".join(
        args for word, args in instructions(DOCKER / "sidecar.Dockerfile") if word == "EXPOSE"
    )
    assert str(http_port) in exposed.split()
    assert str(port_of(option(cmd, "--grpc"))) in exposed.split()


def test_sidecar_image_health_checks_its_http_face_without_curl() -> None:
    dockerfile = DOCKER / "sidecar.Dockerfile"
    http_port = port_of(option(exec_form(dockerfile, "CMD"), "--http"))
    (health,) = [args for word, args in instructions(dockerfile) if word == "HEALTHCHECK"]
    assert "curl" not in health
    assert f"http://127.0.0.1:{http_port}/healthz" in health
    users = [args for word, args in instructions(dockerfile) if word == "USER"]
    assert users
    assert users[-1] not in ("root", "0")
