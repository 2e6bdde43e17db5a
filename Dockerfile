# memefx on an official PyTorch CUDA runtime image. The install lines are the Makefile's own
# (TORCH pin, then the project with its extras); tests/test_container.py checks they stay in step.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
ENV PIP_NO_CACHE_DIR=1 WANDB_MODE=offline MEMEFX_CACHE=/cache PYTHONUNBUFFERED=1
WORKDIR /opt/memefx
COPY pyproject.toml README.md Makefile constraints.txt ./
COPY memefx ./memefx
COPY configs ./configs
COPY scripts ./scripts
RUN python -m pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1 \
 && python -m pip install -c constraints.txt -e '.[wandb,minilm,quant,dev]' \
 && python scripts/check_install.py
ENTRYPOINT ["memefx"]
CMD ["--help"]
