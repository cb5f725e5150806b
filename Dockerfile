# The image every cluster node runs (cluster/kuberay/*.yaml, cluster/ray-cluster.yaml's `docker:` section):
# Python, the project and its dependencies, nothing else. The same file builds both variants:
#
#   docker build -t ebd:cpu .                                                        (CPU torch, ~1.5 GB)
#   docker build -t ebd:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   (CUDA torch)
#
# CUDA wheels carry their own CUDA runtime: the GPU node needs only the NVIDIA driver (and the container toolkit).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# Ray's dashboard agent and `ray job submit` need procps (ps) and curl for health checks only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps=2:4.* curl=7.* \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 ray
WORKDIR /home/ray/ebd

# torch first, from the chosen index, so the project's `torch>=2.4` range is already met and pip keeps it.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# Dependencies before the code, so a code change does not reinstall them; constraints.txt pins the versions CI
# tested.
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline/__init__.py pipeline/__init__.py
COPY jobs/__init__.py jobs/__init__.py
RUN pip install --constraint constraints.txt ".[cluster,inspect]"

COPY pipeline pipeline
COPY jobs jobs
COPY configs configs
COPY cluster cluster
COPY models models
RUN pip install --no-deps --constraint constraints.txt ".[cluster,inspect]" && chown -R ray:ray /home/ray

USER 1000:1000
EXPOSE 6379 8265 8080
CMD ["ebd", "--help"]
