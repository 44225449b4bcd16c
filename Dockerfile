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
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CMEK_ADMIN_PORT', '8081'), timeout=2)"]
ENTRYPOINT ["cmek-proxy"]
CMD ["serve", "--config", "/etc/cmek-proxy/config.yaml"]
