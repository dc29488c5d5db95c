# deepgate's sidecar image: the provider gateway (`deepgate-sidecar --role gateway`).
#
# Build from the repository root (docker/compose.yaml does this):
#   docker build -f docker/sidecar.Dockerfile -t deepgate-sidecar .

# --- build: the virtual environment and the gRPC modules generated from proto/ ---------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/deepgate/.venv/bin:$PATH

WORKDIR /opt/deepgate
COPY pyproject.toml README.md ./
COPY deepgate/ deepgate/
COPY plugins/ plugins/
COPY sidecar/ sidecar/
COPY proto/ proto/

# grpcio-tools is resolved together with the project so that the generated code matches the
# grpcio and protobuf that ship, then removed: it only builds sidecar/_proto/ (as `make` does).
# The install is editable, as with `make`: the source in /opt/deepgate (with sidecar/default.yaml
# and the generated sidecar/_proto/) is what runs.
RUN set -eux; \
    python -m venv /opt/deepgate/.venv; \
    pip install -e /opt/deepgate "grpcio-tools>=1.62,<2"; \
    python proto/generate.py; \
    pip uninstall -y grpcio-tools; \
    rm -rf proto; \
    deepgate-sidecar --check-config; \
    python -c 'import sidecar.app, sidecar.grpc_service'

# --- runtime -----------------------------------------------------------------------------------
FROM python:3.11-slim

RUN groupadd --system --gid 10001 deepgate \
    && useradd --system --gid deepgate --uid 10001 --no-create-home \
       --shell /usr/sbin/nologin deepgate

# Same base image and same path as the build stage: the venv's interpreter link stays valid.
COPY --from=build /opt/deepgate /opt/deepgate

ENV PATH=/opt/deepgate/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER deepgate
WORKDIR /opt/deepgate

# 9180: the HTTP face (APISIX's upstream, apisix-conf/apisix.yaml); 9182: the deepgate.v1 gRPC face.
EXPOSE 9180 9182

# No curl in slim images: ask /healthz with Python (any non-2xx answer raises, exit 1).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9180/healthz', timeout=3)"]

# SIGTERM (docker stop's default) lets requests and streams in flight finish.
CMD ["deepgate-sidecar", "--role", "gateway", "--http", "0.0.0.0:9180", "--grpc", "0.0.0.0:9182"]
