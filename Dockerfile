# One image for every mgmflow role (API, orchestration worker, GPU workers); the command picks the role.
#   docker build -t mgmflow .                                   # CUDA torch (default)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t mgmflow:cpu .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MGMFLOW_HOME=/data \
    MGMFLOW_MODELS_DIR=/models \
    HF_HOME=/models/hf

WORKDIR /app

# 1. torch first, pinned exactly: with a range pip may pick another build (or a multi-GB one twice).
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0

# 2. The project with the tested versions of everything else.
COPY pyproject.toml constraints.txt README.md ./
COPY models ./models
COPY workers ./workers
COPY tools ./tools
COPY orchestrator ./orchestrator
COPY workflows ./workflows
RUN pip install -c constraints.txt . \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

RUN useradd --create-home --uid 1000 mgmflow && mkdir -p /data /models && chown mgmflow /data /models
USER mgmflow
VOLUME ["/data", "/models"]
EXPOSE 8000

ENTRYPOINT ["mgmflow"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
