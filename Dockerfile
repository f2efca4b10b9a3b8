# gptoss-runtime: CUDA + PyTorch image with the runtime installed.
#
#   docker build -t gptoss-runtime:0.1.0 .
#   docker run --gpus all --rm gptoss-runtime:0.1.0                           # debug model, 1 GPU
#   docker run --gpus all --rm gptoss-runtime:0.1.0 --config /opt/gptoss/configs/gptoss_20b.toml ...
#
# On Slurm: pyxis (containers/enroot_import.sh -> .sqsh) or Apptainer (containers/gptoss.def);
# air-gapped clusters: containers/README.md. The base is torch 2.11 + CUDA 12.8 (H100/sm_90 and
# Blackwell), pinned by tag AND digest (a re-pushed tag cannot change the image); to move it:
# `docker buildx imagetools inspect pytorch/pytorch:<tag>` prints the new digest.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime@sha256:eee11b3b3872a8c838e35ef48f08b2d5def2080902c7f666831310ca1a0ef2be
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="gptoss-runtime" \
      org.opencontainers.image.description="PyTorch training runtime for OpenAI's GPT-OSS MoE models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

# No HF_HOME here: the image's ENV would override the user's (Apptainer, pyxis), and the
# default ($HOME/.cache/huggingface) is writable wherever the image runs.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=3

# Non-root user gptoss, uid 1000 (pyxis/enroot and Apptainer run as the calling user anyway).
RUN useradd --create-home --uid 1000 --shell /bin/bash gptoss \
    && mkdir -p /workspace \
    && chown gptoss:gptoss /workspace

WORKDIR /opt/gptoss
# 1. The dependencies, from pyproject.toml alone: this layer is rebuilt only when the dependency
#    list changes, not on every code change. The base's torch 2.11 satisfies torch>=2.11, so pip
#    keeps it. submitit (pinned: submit.py uses private names of it), debugpy/py-spy for
#    slurm/README.md's debugging recipes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "submitit==1.5.4" "debugpy==1.8.22" "py-spy==0.4.3" \
    && rm /tmp/requirements.txt
# 2. The code: no dependency resolution left to do.
COPY README.md ./
COPY runtime ./runtime
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import runtime, torch; print('runtime ok, torch', torch.__version__)"
COPY configs ./configs
COPY slurm ./slurm
COPY submit.py ./

USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "runtime.train"]
CMD ["--config", "/opt/gptoss/configs/debugmodel.toml", "--job.dump_folder=/workspace/outputs/debugmodel"]
