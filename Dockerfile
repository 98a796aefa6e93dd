# edgeproxy: the ingress data plane. Build: docker build -t edgeproxy .
# The build stage has a C compiler: the wheel carries the Cython-compiled hot path (setup.py).
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY edgeproxy ./edgeproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
 && python -c "import sys, zipfile, glob; w = glob.glob('/wheels/edgeproxy-*.whl')[0]; \
sys.exit(0 if any(n.endswith('.so') for n in zipfile.ZipFile(w).namelist()) else 'hot path not compiled')"

FROM python:3.11-slim
RUN useradd --system --uid 10001 edgeproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /etc/edgeproxy/config
USER 10001
EXPOSE 8080 8443 9901
# In a cluster: --in-cluster (see deploy/). Without one: the manifests baked in above.
ENTRYPOINT ["edgeproxy", "run"]
CMD ["--manifests", "/etc/edgeproxy/config", "--http", "0.0.0.0:8080", "--https", "0.0.0.0:8443", "--admin", "0.0.0.0:9901"]
