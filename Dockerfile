# enforcer container image: a non-root Python runtime with uvloop.
#   docker build -t enforcer .
#   docker run --rm enforcer --version
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY enforcer ./enforcer
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home enforcer
USER 10001
# Config and TLS material are mounted (ConfigMap / Secret); see deploy/.
EXPOSE 15001 15006 9901
ENTRYPOINT ["enforcer"]
CMD ["run", "-c", "/etc/enforcer/config.yaml"]
