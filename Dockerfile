# cmek-proxy: production image (serve mode). Build: docker build -t cmek-proxy .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels '.[fast]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin cmek
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
# S3 listener and admin listener (health, readiness, metrics).
EXPOSE 8080 8081
ENV PYTHONUNBUFFERED=1
# Healthy = the admin listener named by the configuration (and its CMEK_PROXY__ADMIN__...
# overrides) answers /healthz. The start period covers start-up, which validates every
# configured key with its KMS before the listeners open.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["cmek-proxy", "health", "--config", "/etc/cmek-proxy/config.yaml", "--timeout", "3"]
ENTRYPOINT ["cmek-proxy"]
CMD ["serve", "--config", "/etc/cmek-proxy/config.yaml"]
