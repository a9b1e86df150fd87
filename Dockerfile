# StableSeg Label Studio ML backend (Label Studio's ML backend conventions: port 9090,
# MODEL_DIR, LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, BASIC_AUTH_USER / BASIC_AUTH_PASS).
#
#   docker compose up --build          # see docker-compose.yml for the GPU reservation
#
# pip pairs torch and torchvision from the registry (CUDA builds: they use the GPU that
# docker's NVIDIA runtime passes in, and run on the CPU where there is none).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=4 \
    MODEL_DIR=stable-diffusion-v1-5/stable-diffusion-v1-5 \
    HF_HOME=/data/hf-cache \
    LOG_LEVEL=INFO

# pydensecrf2 (the CRF of the pseudo-label pipeline) builds from source.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY labeler ./labeler
COPY exporters ./exporters
COPY ml_backend ./ml_backend
RUN pip install .

EXPOSE 9090
VOLUME ["/data"]

# --model comes from MODEL_DIR, the device from STABLESEG_DEVICE (default: CUDA when present),
# basic auth from BASIC_AUTH_USER / BASIC_AUTH_PASS; every other setting from its STABLESEG_*
# variable (see docs/settings.md, docs/label-studio.md and docs/security.md).
CMD ["sh", "-c", "exec stableseg serve --host 0.0.0.0 --port \"$PORT\" --workers \"$WORKERS\" --threads \"$THREADS\" --log-level \"$LOG_LEVEL\""]
