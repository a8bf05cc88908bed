# enforcer container image: Debian's Python 3.11, enforcer in a virtualenv, non-root.
#
#   podman build -t enforcer .            (or docker build)
#   podman run --rm enforcer --version
#
# Runs as uid 10001 with a read-only root file system and every capability dropped (the
# listeners in deploy/ are on ports above 1024). The config, the rules and the TLS
# material are mounted (ConfigMaps and a Secret as directories, see docs/kubernetes.md);
# nothing else is written. The image declares no VOLUME for the config on purpose: started
# without the mount, `enforcer run` says what to mount where.
#
# BASE: Debian bookworm-slim by tag and digest. CI builds from a base it makes itself
# (debootstrap --variant=minbase + podman import, see .ci/image) with
# --build-arg BASE=... --pull=never, because no container registry is reachable there.
ARG BASE=debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

# --- build: a virtualenv with enforcer and its native relay pump --------------------------
FROM ${BASE} AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       python3 python3-venv python3-dev gcc libc6-dev libssl-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Every package, the build backend included, from the hash-checked locks (requirements/),
# in a layer of its own: a change to enforcer's code does not download them again.
# pip_ca (optional build secret): a CA bundle for pip when the build's way out goes through
# a TLS-inspecting proxy (CI passes its machine's bundle); nothing of it stays in the image.
COPY requirements/build.lock requirements/runtime.lock requirements/
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/enforcer \
    && /opt/enforcer/bin/pip install --require-hashes --only-binary :all: -r requirements/build.lock \
    && /opt/enforcer/bin/pip install --require-hashes --only-binary :all: -r requirements/runtime.lock
COPY pyproject.toml setup.py README.md ./
COPY enforcer ./enforcer
RUN /opt/enforcer/bin/pip install --no-deps --no-build-isolation . \
    && cd / && /opt/enforcer/bin/python -c "from enforcer.dataplane import native; \
assert native.available(), native.unavailable_reason()" \
    && /opt/enforcer/bin/pip uninstall -y pip setuptools wheel

# --- runtime: Python and the virtualenv, nothing to compile with ------------------------
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# nftables: `enforcer intercept apply` in the pod's init container (root with NET_ADMIN);
# the sidecar itself runs as uid 10001, the uid the interception rules skip
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates nftables \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && echo "enforcer:x:10001:10001:enforcer:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
    && echo "enforcer:x:10001:" >> /etc/group
COPY --from=build /opt/enforcer /opt/enforcer
ENV PATH=/opt/enforcer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# 15006 mTLS in, 15001 plaintext from the app (sidecar), 8443 gateway, 9901 admin
EXPOSE 15006 15001 8443 9901
ENTRYPOINT ["enforcer"]
CMD ["run", "-c", "/etc/enforcer/config/config.yaml", "--log-json"]
# last: a new revision changes no layer above (they stay cached)
ARG BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="enforcer" \
      org.opencontainers.image.description="mTLS-terminating TCP/TLS proxy: sidecar and gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"
