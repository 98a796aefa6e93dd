# edgeproxy: the ingress data plane.
#   docker build -t REGISTRY/edgeproxy:0.1.0 . && docker push REGISTRY/edgeproxy:0.1.0
# Build stage: a C compiler turns the hot path into Cython extensions (setup.py); the
# dependencies are built first, in their own layer, so a source change rebuilds only edgeproxy.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt
COPY edgeproxy ./edgeproxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -c "import sys, zipfile, glob; w = glob.glob('/wheels/edgeproxy-*.whl')[0]; \
sys.exit(0 if any(n.endswith('.so') for n in zipfile.ZipFile(w).namelist()) else 'hot path not compiled')"

# Final stage: no compiler, no wheels left behind (they are mounted, not copied).
FROM python:3.11-slim-bookworm
# libcap2-bin only for setcap, removed in the same layer.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libcap2-bin \
 && useradd --system --uid 10001 --user-group --no-create-home edgeproxy \
 && setcap cap_net_bind_service=+ep "$(readlink -f /usr/local/bin/python3.11)" \
 && apt-get purge -y libcap2-bin && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*
# The non-root process binds 80/443 through the interpreter's file capability (the
# container's capability list alone gives a non-root process nothing): workers are the same
# interpreter. Needs allowPrivilegeEscalation (file capabilities do not apply under
# no_new_privs); deploy/daemonset says so. Ports above 1024 (deploy/deployment) need nothing.
ARG VERSION=0.1.0
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "edgeproxy==${VERSION}"
COPY config /etc/edgeproxy/config
USER 10001:10001
# Nothing is written at run time: certificates go through memory files, logs to stdout.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 8080 8443 9901
# In a cluster: --in-cluster (see deploy/). Without one: the manifests baked in above.
ENTRYPOINT ["edgeproxy", "run"]
CMD ["--manifests", "/etc/edgeproxy/config", "--http", "0.0.0.0:8080", "--https", "0.0.0.0:8443", "--admin", "0.0.0.0:9901"]
