# GPU image for training and evaluating this project on ImageNet.
#
# Base: NVIDIA's PyTorch container from NGC. It already carries CUDA, cuDNN, NCCL, a CUDA build of
# torch/torchvision and NVIDIA DALI, so the dali-cpu/dali-gpu backends work out of the box.
# Override the tag with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 (any tag with
# torch >= 2.4 works).
#
# Build:  docker build -t pedconv .
# Run:    docker run --gpus all --ipc=host -it --rm -v /path/to/imagenet:/data -v $PWD/logs:/workspace/pedconv/logs pedconv
#         (inside) python multiproc.py --nproc_per_node 8 main.py /data --config configs/pedconv_table1/resnet18_pedconv.yaml
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

ENV PYTHONUNBUFFERED=1
CMD ["bash"]
