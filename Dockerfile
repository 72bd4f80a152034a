# One image for every Switchyard service: `switchyard <service>` (controller, engine, gateway,
# kv, tools). Build, from the repository root:
#
#   CPU (default; torch from the PyTorch CPU index, a much smaller image):
#     docker build -t switchyard:0.1.0 .
#   CUDA (torch's PyPI wheels, which bring their CUDA runtime; the node supplies the driver
#   through the NVIDIA container toolkit):
#     docker build -t switchyard:0.1.0-cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#
# The Helm chart runs it as user 10001 with a read-only root filesystem; everything the
# services write goes to /var/lib/switchyard (SWITCHYARD_DATA_DIR) and /tmp.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- build: a virtual environment with the project and its dependencies -------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/switchyard
ENV PATH=/opt/switchyard/bin:$PATH
# Dependencies first, in their own layer: a source change does not reinstall torch.
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt
COPY switchyard ./switchyard
COPY controller ./controller
COPY engine_service ./engine_service
COPY gateway ./gateway
COPY kv_service ./kv_service
COPY tool_service ./tool_service
RUN pip install --no-deps . && switchyard --help > /dev/null

# --- runtime: the environment only, as an unprivileged user -------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 switchyard \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/switchyard --create-home switchyard
COPY --from=build /opt/switchyard /opt/switchyard
ENV PATH=/opt/switchyard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SWITCHYARD_DATA_DIR=/var/lib/switchyard \
    HF_HOME=/var/lib/switchyard/huggingface
USER 10001:10001
WORKDIR /var/lib/switchyard
# gateway HTTP, controller gRPC, engine gRPC and metrics, KV service gRPC and metrics, tools gRPC
EXPOSE 8000 50051 50100 9100 50060 9060 50070
ENTRYPOINT ["switchyard"]
CMD ["--help"]
