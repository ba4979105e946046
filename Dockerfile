# syntax=docker/dockerfile:1
#
# paramserver: the front door (`paramserver serve`) and a Ray node image for its shards (KubeRay
# runs `ray start` in it; so does `ray up` with docker). See deploy/README.md.
#
#   CPU (default):  docker build -t paramserver:0.1.0 .
#   CUDA:           docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t paramserver:0.1.0-cuda .
#
# The CUDA build takes torch from an index whose Linux wheels are CUDA builds: PyPI's torch 2.13.0
# is built for CUDA 13.0 and brings the CUDA runtime as nvidia-* wheels, so the base image needs
# no CUDA toolkit, only the host's NVIDIA driver (new enough for that CUDA), which the NVIDIA
# container toolkit mounts in (`docker run --gpus all`, or nvidia.com/gpu on Kubernetes). For
# another CUDA version, point TORCH_INDEX at the matching PyTorch index
# (https://download.pytorch.org/whl/cuXYZ) if it serves this torch version. BASE_IMAGE can be any
# image with CPython >= 3.11 (python3, pip) on PATH, e.g. a CUDA image of your own.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# torch comes from TORCH_INDEX, at the version pyproject.toml pins (a test checks that they agree).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# server: the service (Ray, torch, health checking); dashboard: ray[default] (the dashboard and
# its agent, which KubeRay's probes, `ray job submit` and RayJob need).
ARG EXTRAS=server,dashboard

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A non-root user (uid 1000, as in Ray's images) owning the service's working directory, where
# `serve` keeps snapshots/, state/ and spill/ unless told otherwise (mount volumes there).
RUN groupadd --gid 1000 paramserver \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash paramserver \
    && install -d -o paramserver -g paramserver /var/lib/paramserver

# The packages go to the interpreter's own prefix (/usr/local on python images): `paramserver`
# and `ray` land in /usr/local/bin, which stays on PATH even in the login shells (`bash -l`)
# KubeRay starts containers with, where a virtualenv's bin directory would be dropped.
RUN python3 -m pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY paramserver ./paramserver
COPY clients/python ./clients/python
RUN python3 -m pip install --no-cache-dir "paramserver[${EXTRAS}] @ file:///src" \
    && python3 -I -c "import paramserver, paramserver_client, ray, torch" \
    && paramserver --help > /dev/null \
    && ray --version \
    && rm -rf /src

COPY --chmod=0755 deploy/healthcheck.py /opt/paramserver/healthcheck.py
COPY --chmod=0755 deploy/with-ray-head.sh /usr/local/bin/with-ray-head

USER 1000:1000
WORKDIR /var/lib/paramserver

# 50051: the front door (gRPC); 9100: Prometheus metrics (serve --metrics-port);
# 54000-54999: shard data ports (serve --shard-port-range); 6379: Ray GCS; 8265: Ray dashboard
# and job API; 10001: Ray client.
EXPOSE 50051 9100 54000-54999 6379 8265 10001

# grpc.health.v1 Health/Check of paramserver.v1.JobService on 127.0.0.1:50051 (the front door
# says SERVING once its Ray cluster answers). A container used as a Ray worker node has no
# front door: run it with --no-healthcheck.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/opt/paramserver/healthcheck.py"]

# A single-node service with its own Ray. On a cluster the image runs `with-ray-head paramserver
# serve --address auto ...` on the head and `ray start --address ... --block` on the workers.
CMD ["paramserver", "serve", "--host", "0.0.0.0", "--shard-host", "0.0.0.0", "--port", "50051", \
     "--metrics-port", "9100", "--shard-port-range", "54000-54999", "--log-format", "json"]
