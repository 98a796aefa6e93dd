# edgeproxy: the ingress data plane. Build: docker build -t edgeproxy .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgeproxy ./edgeproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

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
