# enforcer container image: a non-root Python runtime with uvloop.
#   docker build -t enforcer .
#   docker run --rm enforcer --version
FROM python:3.11-slim AS build
WORKDIR /src
# gcc builds the native relay pump (enforcer/dataplane/_pump.c); the runtime stage has none
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY enforcer ./enforcer
RUN pip install --no-cache-dir --prefix=/install . \
    && python -c "import sys; sys.path.insert(0, '/install/lib/python3.11/site-packages'); \
from enforcer.dataplane import pump; assert pump.available(), pump.UNAVAILABLE"

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home enforcer
USER 10001
# Config and TLS material are mounted (ConfigMap / Secret); see deploy/.
EXPOSE 15001 15006 9901
ENTRYPOINT ["enforcer"]
CMD ["run", "-c", "/etc/enforcer/config.yaml"]
