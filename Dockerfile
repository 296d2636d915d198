# cellpaint-rcic on a CUDA GPU.
#
#   docker build -t cellpaint-rcic .
#   docker run --gpus all --ipc=host -v /path/to/rxrx1:/data -v $PWD/results:/results cellpaint-rcic \
#       python main.py --data /data --save /results/dn161_0 -e 130 --pl-epoch 90 \
#       --lr cosine,1.5e-4,90,6e-5,150,0 --pl-size-func 0.6*x+0.4 --cv-number -1 --seed 0
#   docker run --gpus all --ipc=host -v /path/to/rxrx1:/data -v $PWD/results:/results cellpaint-rcic \
#       python main.py --mode predict --data /data --cv-number -1 --tta 8 --load /results/dn161_0.129
#   docker run -v /path/to/rxrx1:/data -v $PWD/results:/results cellpaint-rcic \
#       python make_submission.py --data /data -o /results/submission.csv /results/dn161_0.129.output
#
# - /data: the competition data (train.csv, test.csv, ..., train/, test/) or the RxRx1 release (metadata.csv,
#   images/); read-only is fine.
# - /results: mount a host folder and point --save/--load there, or checkpoints vanish with the container.
# - /workspace/data links to /data and ./results to /results, so the documented commands (default --data ../data,
#   --save results/dn161_0) also work unchanged inside the container.
# - --ipc=host (or --shm-size=16g): DataLoader workers hand batches over in shared memory, and Docker's default
#   64 MB /dev/shm is too small for them.
# - ImageNet weights are downloaded into TORCH_HOME=/cache/torch on first use; add -v $HOME/.cache/torch:/cache/torch
#   to keep them between runs (or to supply them on a machine without internet).
# - Files come out owned by root; add --user "$(id -u):$(id -g)" to own them (the writable paths allow it).

# An official PyTorch *runtime* image: CUDA 12.8 + cuDNN 9 libraries, no compilers (much smaller than -devel).
# Its torch is older than the one requirements.txt pins, and that is fine: the code needs torch >= 2.3 and
# torchvision >= 0.18 (torch.amp.GradScaler(device), torchvision.models.get_model/list_models). The host needs the
# NVIDIA Container Toolkit and a driver recent enough for CUDA 12.8 (R570 or newer); H100/H200 are fine.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/cache/torch \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /workspace/cellpaint-rcic

# Dependencies first, so editing the code does not reinstall them. The torch and torchvision lines are filtered
# out of requirements.txt, and the image's own versions are passed as constraints: pip keeps the base image's
# CUDA build instead of downloading another ~3 GB torch (and fails loudly if some package demanded a newer one).
# The versions come from the installed distributions' metadata, which is what pip compares: torch.__version__
# can differ from it (a "+cuXXX" suffix), and a constraint taken from there may match nothing.
# matplotlib is optional for the project (training-curve PNGs), but cheap to have here.
COPY requirements.txt ./
RUN grep -Ev '^[[:space:]]*(torch|torchvision)[[:space:]]*([=<>!~;]|$)' requirements.txt > /tmp/requirements.txt \
 && python -c "from importlib.metadata import version; print(*(f'{p}=={version(p)}' for p in ('torch', 'torchvision')), sep='\n')" \
      > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt matplotlib \
 && rm /tmp/requirements.txt /tmp/constraints.txt

COPY . .

# Fail the build, not the first run, if an import is broken; make the mount points writable for --user.
RUN python main.py --help > /dev/null \
 && ln -s /data /workspace/data \
 && ln -s /results results \
 && mkdir -p /results /cache/torch \
 && chmod 1777 /results /cache /cache/torch

CMD ["python", "main.py", "--help"]
