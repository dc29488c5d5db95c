# deepgate's APISIX image: the official Apache APISIX image plus Python and deepgate's plugin
# runner, which APISIX starts itself through `ext-plugin.cmd` in apisix-conf/config.yaml.
#
# Build from the repository root (docker/compose.yaml does this):
#   docker build -f docker/apisix.Dockerfile -t deepgate-apisix .
#
# The base is Debian 12 (bookworm) with Python 3.11; deepgate needs Python >= 3.11. The image's
# user (apisix, uid 636), working directory (/usr/local/apisix), entrypoint
# (/docker-entrypoint.sh docker-start) and stop signal are kept as they are.
FROM apache/apisix:3.17.0-debian

USER root

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "deepgate needs Python >= 3.11, this base has " + sys.version)'

# Only what the runner imports: the shared core and the plugins (plus the files pip needs).
WORKDIR /opt/deepgate
COPY pyproject.toml README.md ./
COPY deepgate/ deepgate/
COPY plugins/ plugins/

# An editable install, as `make` does: the source stays in /opt/deepgate and is what runs.
# ext-plugin.cmd is ["deepgate-runner"], found on the PATH that nginx_config.envs passes on.
RUN set -eux; \
    python3 -m venv /opt/deepgate/.venv; \
    /opt/deepgate/.venv/bin/pip install --no-cache-dir --disable-pip-version-check -e /opt/deepgate; \
    ln -s /opt/deepgate/.venv/bin/deepgate-runner /usr/local/bin/deepgate-runner; \
    /opt/deepgate/.venv/bin/python -c 'import plugins.runner.__main__, plugins.registry'

# The standalone configuration; docker/compose.yaml also bind-mounts both files read-only.
COPY --chown=apisix:apisix apisix-conf/config.yaml /usr/local/apisix/conf/config.yaml
COPY --chown=apisix:apisix apisix-conf/apisix.yaml /usr/local/apisix/conf/apisix.yaml
RUN /opt/deepgate/.venv/bin/deepgate-check-config /usr/local/apisix/conf/apisix.yaml

# Standalone data plane: the entrypoint checks that config.yaml says so (role: data_plane,
# config_provider: yaml), runs `apisix init` and skips `apisix init_etcd`. It never rewrites
# files that exist, so read-only mounts are fine.
ENV APISIX_STAND_ALONE=true

WORKDIR /usr/local/apisix
USER apisix
