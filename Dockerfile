# gptoss-runtime: CUDA + PyTorch image with the runtime installed.
#
#   docker build -t gptoss-runtime:0.1.0 .
#   docker run --gpus all --rm gptoss-runtime:0.1.0                           # debug model, 1 GPU
#   docker run --gpus all --rm gptoss-runtime:0.1.0 --config /opt/gptoss/configs/gptoss_20b.toml ...
#
# On Slurm: pyxis (containers/enroot_import.sh -> .sqsh) or Apptainer (containers/gptoss.def);
# see containers/README.md. The base pins torch 2.11 + CUDA 12.8 (H100/sm_90 and Blackwell).
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

LABEL org.opencontainers.image.title="gptoss-runtime" \
      org.opencontainers.image.description="PyTorch training runtime for OpenAI's GPT-OSS MoE models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/workspace/.cache/huggingface \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=3

# Non-root user gptoss, uid 1000 (pyxis/enroot and Apptainer run as the calling user anyway).
RUN useradd --create-home --uid 1000 --shell /bin/bash gptoss \
    && mkdir -p /workspace \
    && chown gptoss:gptoss /workspace

WORKDIR /opt/gptoss
# Dependencies first (cached while only the code changes): the base already has torch 2.11,
# which satisfies torch>=2.11, so pip keeps it. submitit for submit.py, debugpy/py-spy for
# slurm/README.md's debugging recipes.
COPY pyproject.toml README.md ./
COPY runtime ./runtime
RUN pip install --no-cache-dir . "submitit==1.5.4" "debugpy==1.8.22" "py-spy==0.4.3" \
    && python -c "import runtime, torch; print('runtime ok, torch', torch.__version__)"
COPY configs ./configs
COPY slurm ./slurm
COPY submit.py ./

USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "runtime.train"]
CMD ["--config", "/opt/gptoss/configs/debugmodel.toml", "--job.dump_folder=/workspace/outputs/debugmodel"]
