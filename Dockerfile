# syntax=docker/dockerfile:1.7
# kvflow's CPU serving image for small boxes (docs/edge.md, issue 27).
#
#   docker build -t kvflow:cpu .                                  # amd64: kernels for AVX2 (x86-64-v3)
#   docker buildx build --platform linux/arm64 -t kvflow:cpu .    # arm64: the generic C++ loops (armv8-a)
#   docker build --build-arg KVFLOW_EXTRAS=[ray] -t kvflow:cpu-ray .  # for deploy/overlays/disagg
#   docker run --rm -p 8000:8000 -v kvflow-models:/models -v kvflow-kv:/var/lib/kvflow/kv-offload kvflow:cpu
#   podman build --format docker --skip-unused-stages=false -t kvflow:cpu .   # podman 4.x (docs/edge.md)
#
# Two stages: `build` installs kvflow from requirements-lock.txt with the CPU torch wheel into a
# virtual environment and compiles the C++ CPU kernels for a stated baseline ISA (KVFLOW_CPU_ISA,
# see kvflow/model/cpu_kernels.py), so a container loads them instead of compiling for a minute;
# `runtime` copies the environment and the compiled kernels, with no compiler, and runs as a
# non-root user. The shipped `tiny` model is package data, so it is inside the image.

# BuildKit sets TARGETARCH; the default keeps the classic builder working for amd64.
ARG TARGETARCH=amd64
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The baseline ISA per architecture: an edge x86 box has AVX2 but rarely AVX-512; arm64 (a
# Raspberry Pi 5, Graviton) takes the generic loops. The same value must be set when the kernels
# are built and when they are loaded: it is part of their cache key.
FROM ${PYTHON_IMAGE} AS base-amd64
ENV KVFLOW_CPU_ISA=avx2 KVFLOW_REQUIRE_KERNELS=1

# arm64: the kernels' x86 code is behind its guards and they compile for armv8-a (a cross-compiler
# check in tests/model/test_cpu_kernels_build.py), but no arm64 image has been built or run yet
# (docs/edge.md): until one has, a failed kernel build leaves the image on the PyTorch modules (the
# same model, slower) instead of failing it.
FROM ${PYTHON_IMAGE} AS base-arm64
ENV KVFLOW_CPU_ISA=generic KVFLOW_REQUIRE_KERNELS=0

# hadolint ignore=DL3006
FROM base-${TARGETARCH} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kvflow/venv \
    PATH=/opt/kvflow/venv/bin:$PATH \
    KVFLOW_CACHE=/opt/kvflow/cache

FROM base AS build
# Extras to install with kvflow, e.g. [ray] for the disaggregated overlay (deploy/overlays/disagg).
ARG KVFLOW_EXTRAS=""
# A C++ compiler for the kernels (torch's JIT build; ninja comes from the lock). Debian's
# bookworm packages are fixed per point release, hence no version pins.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libgomp1 \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/kvflow/venv
WORKDIR /src
COPY pyproject.toml requirements-lock.txt README.md ./
COPY kvflow ./kvflow
# The exact versions the suite passes on; torch's CPU build (torch==2.13.0+cpu) comes from its index.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c requirements-lock.txt ".${KVFLOW_EXTRAS}" \
 && python -c "import kvflow, torch; print('kvflow', kvflow.__version__, 'torch', torch.__version__)"
# Compile both extensions (the C++ forward and the quantised-weight kernels) now, and fail the
# build if either is missing (KVFLOW_REQUIRE_KERNELS=1): a container must never fall back to a
# minute-long first-use build. Out of /src: there `python -c` would import the source tree, not the
# installed package, and the kernels' cache key (which includes where kvflow/csrc lies) would not be
# the runtime's, which then finds no build and has no compiler (seen in the first podman build).
WORKDIR /opt/kvflow
RUN python -c "import os; from kvflow.model import cpu_kernels; from kvflow.model.quant import kernels; \
ok = cpu_kernels.load_extension() is not None and kernels.load_extension() is not None; \
assert ok or os.environ['KVFLOW_REQUIRE_KERNELS'] == '0', 'kernel build failed'; \
print('kernels for', cpu_kernels.CFLAGS[1], 'in', cpu_kernels.build_dir(), 'built' if ok else 'NOT BUILT')"

FROM base AS runtime
# libgomp1: the kernels' OpenMP runtime (the compiler is left behind in the build stage).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 kvflow \
 && useradd --system --uid 10001 --gid kvflow --create-home --home-dir /home/kvflow kvflow \
 && mkdir -p /models /var/lib/kvflow/kv-offload \
 && chown kvflow:kvflow /models /var/lib/kvflow/kv-offload
# The environment stays root-owned (read-only to the server); the kernel cache is the user's,
# since torch's loader takes a lock file in the build folder. Same paths as in the build stage,
# so the build files the loader checks are current and nothing recompiles.
COPY --from=build /opt/kvflow/venv /opt/kvflow/venv
COPY --from=build --chown=10001:10001 /opt/kvflow/cache /opt/kvflow/cache
USER 10001:10001
WORKDIR /home/kvflow
# Fail the build unless the runtime loads the prebuilt kernels as its own user, with no compiler:
# torch's loader reruns ninja, which must find the build current (same paths, same ninja), or
# it would try to compile and the server would fall back to the slower PyTorch modules.
RUN python -c "import os; from kvflow.model import cpu_kernels; from kvflow.model.quant import kernels; \
ok = cpu_kernels.load_extension() is not None and kernels.load_extension() is not None; \
assert ok or os.environ['KVFLOW_REQUIRE_KERNELS'] == '0', 'kernels do not load'"
# /models: user model directories or .gguf files (--model /models/NAME); the KV offload tier's files.
VOLUME ["/models", "/var/lib/kvflow/kv-offload"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["kvflow"]
# The shipped tiny model; pass `serve --model /models/NAME ...` to run another.
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", \
     "--kv-offload-dir", "/var/lib/kvflow/kv-offload", "--kv-offload-size", "2"]
