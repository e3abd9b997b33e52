# syntax=docker/dockerfile:1
# aslprep_lite as a BIDS-App container:
#   docker build -t aslprep_lite .
#   docker run --rm -v /data:/data:ro -v /out:/out aslprep_lite /data /out participant
# Mount a work directory to keep (and resume from) the intermediate files; without -w a
# non-root or read-only run uses a folder in $TMPDIR:
#   ... -v /scratch/work:/work aslprep_lite /data /out participant -w /work   (docs/hpc.md)
# Two stages: the builder turns the source tree into a wheel and installs it, with its
# dependencies (binary wheels), into a virtual environment; the final image is a plain Debian
# with Python and that environment only: no compiler, no pip cache, no source tree.
#
# pip behind a TLS-intercepting proxy: pass the proxy's CA bundle as a build secret, e.g.
#   podman build --secret id=pipcert,src=/etc/ssl/certs/ca-certificates.crt -t aslprep_lite .
# Without the secret (a normal `docker build`) pip uses its own CA bundle. The secret is only
# mounted during that RUN step and never stored in a layer.

ARG BASE=debian:trixie-slim

FROM ${BASE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/aslprep_lite
# The dependencies first, from pyproject.toml alone: a change to the code reuses this layer.
COPY pyproject.toml README.md /src/
RUN --mount=type=secret,id=pipcert \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi \
    && /opt/aslprep_lite/bin/python -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && /opt/aslprep_lite/bin/pip install --prefer-binary -r /tmp/requirements.txt
# Then the project as a wheel; then drop pip and the dependencies' own test suites and test
# data (never used by the app).
COPY aslprep_lite /src/aslprep_lite
RUN --mount=type=secret,id=pipcert \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi \
    && /opt/aslprep_lite/bin/pip wheel --no-deps --wheel-dir /dist /src \
    && /opt/aslprep_lite/bin/pip install --prefer-binary /dist/aslprep_lite-*.whl \
    && /opt/aslprep_lite/bin/pip uninstall -y pip \
    && find /opt/aslprep_lite/lib -depth -type d \
        \( -path '*/numpy/*/tests' -o -path '*/scipy/*/tests' -o -path '*/pandas/tests' \
           -o -path '*/nipype/testing/data' -o -path '*/dipy/*/tests' \) -exec rm -rf {} + \
    && /opt/aslprep_lite/bin/python -c "import aslprep_lite.workflows.base, bids, SimpleITK, dipy.align.imwarp" \
    && /opt/aslprep_lite/bin/python -c "from aslprep_lite.templates import layout_embedded_home; layout_embedded_home('/opt/templateflow')"

FROM ${BASE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="aslprep_lite" \
      org.opencontainers.image.description="BIDS-App: arterial spin labeling MRI to calibrated cerebral blood flow (CBF) maps" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /usr/share/doc/* /usr/share/man/*
COPY --from=builder /opt/aslprep_lite /opt/aslprep_lite
# The embedded TemplateFlow home (MNI152NLin2009aSym from nilearn's files), laid out at build
# time so that a read-only image serves it offline; mount a TemplateFlow folder and set
# TEMPLATEFLOW_HOME for other templates (docs/hpc.md).
COPY --from=builder /opt/templateflow /opt/templateflow
# Any UID, read-only image (Apptainer): nothing is written into the image at run time. HOME
# (nipype's ~/.nipype) points to /tmp, which Docker and Apptainer both make writable; Apptainer
# replaces HOME with the caller's own. Python's bytecode is precompiled at install time.
# No network at run time: nipype's online version check (etelemetry) is off.
ENV PATH=/opt/aslprep_lite/bin:${PATH} \
    HOME=/tmp \
    NIPYPE_NO_ET=1 \
    ASLPREP_LITE_TEMPLATES=/opt/templateflow \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8
WORKDIR /tmp
ENTRYPOINT ["aslprep-lite"]
CMD ["--help"]
