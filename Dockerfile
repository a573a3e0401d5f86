# GPU image for training and evaluating this project on ImageNet.
#
# Base: NVIDIA's PyTorch container from NGC. It already carries CUDA, cuDNN, NCCL, a CUDA build of
# torch/torchvision and NVIDIA DALI, so the dali-cpu/dali-gpu backends work out of the box.
# The default tag, 24.12, ships torch 2.6, the oldest torch this project supports (CI tests it:
# requirements-oldest.txt). Override it with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3: any tag
# with torch >= 2.6 works (24.12 or newer); an older one fails the build at the smoke test below.
#
# Build:  docker build -t pedconv .
# Run:    docker run --gpus all --ipc=host -it --rm -v /path/to/imagenet:/data -v $PWD/logs:/workspace/pedconv/logs pedconv
#         (inside) python multiproc.py --nproc_per_node 8 main.py /data --config configs/pedconv_table1/resnet18_pedconv.yaml \
#                      --workspace logs/pedconv_table1/resnet18_pedconv
#         (only what is written under the mounted logs/ outlives the container)
# --ipc=host (or a large --shm-size) is needed: DataLoader workers share batches through /dev/shm.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:24.12-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/pedconv

# requirements.txt is the same runtime file CI installs (via requirements-dev.txt, which includes it
# with `-r requirements.txt`). Its torch/torchvision pins are for the CPU CI machine; here they are
# filtered out so pip keeps the container's CUDA build of torch/torchvision (re-installing them from
# PyPI would replace NVIDIA's tuned build and pull a second CUDA stack).
COPY requirements.txt requirements.txt
RUN grep -v -E '^[[:space:]]*(torch|torchvision)[[:space:]]*([=<>!~;[]|$)' requirements.txt > /tmp/requirements-container.txt \
    && pip install --no-cache-dir -r /tmp/requirements-container.txt \
    && python -c "import torch, torchvision, yaml, tqdm; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

COPY . .
# Smoke test: the package imports on this image's torch (an older torch fails here in one line) and builds and runs a
# PEDConv ResNet-18, so a broken image fails at build time instead of at the first run.
RUN python -c "import torch; from image_classification.models import build_model; \
m = build_model('resnet18', 'pedconv', num_classes=10).eval(); \
y = m(torch.randn(1, 3, 64, 64)); assert y.shape == (1, 10); \
print('image_classification OK: torch', torch.__version__, 'PEDConv ResNet-18 output', tuple(y.shape))"

ENV PYTHONUNBUFFERED=1
CMD ["bash"]
