# memefx on a plain Python image. torch comes in once, from the Makefile's pin (its PyPI wheel brings the
# CUDA libraries: `docker run --gpus all` uses the host's GPUs, and it runs on the CPU too). The install
# lines are the Makefile's own (TORCH pin, then the project with its extras, then the install check);
# tests/test_container.py checks they stay in step.
FROM python:3.11-slim
# provenance.json records the commit the image was built from (no git inside the image):
#   docker build --build-arg MEMEFX_GIT_COMMIT=$(git rev-parse HEAD) -t memefx .
ARG MEMEFX_GIT_COMMIT=unknown
ENV MEMEFX_GIT_COMMIT=$MEMEFX_GIT_COMMIT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 WANDB_MODE=offline MEMEFX_CACHE=/cache PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/memefx
COPY pyproject.toml README.md Makefile constraints.txt ./
COPY memefx ./memefx
COPY configs ./configs
COPY scripts ./scripts
RUN python -m pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1 \
 && python -m pip install -c constraints.txt -e '.[wandb,minilm,quant,dev,lightgbm]' \
 && python scripts/check_install.py
ENTRYPOINT ["memefx"]
CMD ["--help"]
