# lora-aggregator in a container. Its build step is scripts/build-static, which scripts/test (CI)
# runs too, along with scripts/check-static-binary, which starts the result as this image does.
#   docker build -t lora-aggregator .
#   docker run -p 8080:8080 -v lora-data:/data -e LORA_AGGREGATOR_ADMIN_TOKEN=$(openssl rand -hex 32) lora-aggregator
ARG SWIFT_VERSION=6.3
FROM swift:${SWIFT_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/build-static && install -m 0755 .build-static/release/lora-aggregator /usr/local/bin/lora-aggregator

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsqlite3-0 libpq5 zlib1g libzstd1 libopenblas0-pthread curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin lora \
    && mkdir -p /data && chown lora:lora /data
COPY --from=build /usr/local/bin/lora-aggregator /usr/local/bin/lora-aggregator
USER lora
VOLUME /data
# Listening on every interface requires an admin token: pass LORA_AGGREGATOR_ADMIN_TOKEN at run time
# (the server refuses to start without one).
ENV LORA_AGGREGATOR_HOST=0.0.0.0 \
    LORA_AGGREGATOR_PORT=8080 \
    LORA_AGGREGATOR_DATABASE=/data/lora-aggregator.sqlite
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["lora-aggregator", "serve"]
