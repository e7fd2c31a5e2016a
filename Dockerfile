# The image ray_jobs/k8s/rayjob.yaml runs: Python 3.11, exactly requirements.lock, this project at /app.
#   docker build -t registry.example.com/fusemoe:latest .
# CPU build (default): torch 2.13.0+cpu from the PyTorch CPU index, as the Makefile installs it.
# GPU build: the same lock with torch's CUDA wheel swapped in, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                --build-arg TORCH_PIN=torch==2.13.0+cu128 -t registry.example.com/fusemoe:gpu .
# (pick the CUDA tag that the GPU nodes' driver supports; the driver itself comes from the node
# through the NVIDIA device plugin). Not built in CI: no Docker daemon there.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_PIN=torch==2.13.0+cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_BUILD_OPS=0 \
    DVC_NO_ANALYTICS=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    UV_COMPILE_BYTECODE=1

# git: DVC and the run lineage (git sha); g++: DeepSpeed's JIT-built CPU comm op;
# wget: KubeRay's default liveness/readiness probes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git g++ wget \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock pyproject.toml ./
RUN pip install uv==0.13.9 \
    && sed -i "s/^torch==.*/${TORCH_PIN}/" requirements.lock \
    && uv pip install --system --extra-index-url "${TORCH_INDEX}" --index-strategy unsafe-best-match \
       -r requirements.lock
COPY . .
RUN uv pip install --system --no-deps -e .
