# The vidsift image that deploy/*.yaml run: ghcr.io/vidsift/vidsift:0.1.0 (the package version).
#
#   docker build -t ghcr.io/vidsift/vidsift:0.1.0 .
#   docker push ghcr.io/vidsift/vidsift:0.1.0
#
# Pinned: the base image by exact version (replace the tag by its @sha256 digest in your registry mirror if
# you need byte-identical rebuilds), pip by version, every Python package by deploy/constraints.txt (the
# tested closure of `pip install -e ".[dev]"`). The install steps are the README's / `make install`'s:
# Debian's ffmpeg (the FFmpeg libraries torchcodec loads; PyAV bundles its own), then the same package from
# the same pins, but without the dev extra: the image runs jobs, not tests (no moto, playwright, duckdb,
# pytest); tests/test_dockerfile.py keeps them so. The code lives in /opt/vidsift, the manifests'
# working_dir. No data is in the image or on the pods' disks: every artifact is an s3:// URI
# (docs/storage.md).
FROM python:3.11.7-slim-bookworm

LABEL org.opencontainers.image.title="ghcr.io/vidsift/vidsift" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="vidsift: distributed text-to-video retrieval pipeline on Ray" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/vidsift/deploy/constraints.txt

# System FFmpeg libraries for torchcodec: the same apt packages as `make install`.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*
# Image only: wget for KubeRay's readiness / liveness probes (not needed by vidsift itself).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

RUN python -m pip install -q pip==23.2.1

WORKDIR /opt/vidsift
# The runtime dependencies first, in their own layer (code changes do not reinstall torch and Ray): the
# [project] dependencies of pyproject.toml, no extras, at the versions PIP_CONSTRAINT pins. Not
# `-r deploy/constraints.txt`: that is the dev closure and would put the test tools in the image.
COPY pyproject.toml pyproject.toml
COPY deploy/constraints.txt deploy/constraints.txt
RUN python -c "import tomllib; \
      deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
      print(*deps, sep='\n')" > /tmp/runtime-requirements.txt \
    && python -m pip install -q -r /tmp/runtime-requirements.txt && rm /tmp/runtime-requirements.txt
COPY . .
RUN python -m pip install -q -e .

# Ray's images run as uid 1000 ("ray"); caches (VIDSIFT_CACHE, torch) go to its home.
RUN useradd --create-home --uid 1000 ray
USER ray
ENV VIDSIFT_CACHE=/home/ray/.cache/vidsift
CMD ["python", "-m", "jobs.cli"]
