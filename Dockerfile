# enforcer container image: a non-root Python runtime with uvloop.
#   docker build -t enforcer .
#   docker run --rm enforcer --version
FROM python:3.11-slim AS build
WORKDIR /src
# gcc builds the native relay pump (enforcer/dataplane/_pump.c); the runtime stage has none
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# every dependency, and the build backend, from the locks (hashes checked)
COPY requirements/ ./requirements/
RUN pip install --no-cache-dir --require-hashes --only-binary :all: -r requirements/build.lock \
    && pip install --no-cache-dir --require-hashes --only-binary :all: --prefix=/install \
      -r requirements/runtime.lock
COPY pyproject.toml setup.py README.md ./
COPY enforcer ./enforcer
RUN pip install --no-cache-dir --no-deps --no-build-isolation --prefix=/install . \
    && PYTHONPATH=/install/lib/python3.11/site-packages python -c \
      "from enforcer.dataplane import native; assert native.available(), native.unavailable_reason()"

FROM python:3.11-slim
COPY --from=build /install /usr/local
# nftables: `enforcer intercept apply` in the pod's init container (run as root with
# NET_ADMIN); the sidecar itself runs as uid 10001, the uid the rules skip by default.
RUN apt-get update && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home enforcer
USER 10001
# Config and TLS material are mounted (ConfigMap / Secret); see deploy/.
EXPOSE 15001 15006 9901
ENTRYPOINT ["enforcer"]
CMD ["run", "-c", "/etc/enforcer/config.yaml"]
