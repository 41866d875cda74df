#!/usr/bin/env bash
# Container entrypoint: render the repository for the GPUs, start MPS when the rendered
# repository puts more than one instance on a GPU, size the CUDA memory pool for the KV
# hand-off, then run tritonserver (docs/gpu.md).
#
#   entrypoint.sh [serve] [tritonserver flags...]   render + serve (the image's CMD)
#   entrypoint.sh COMMAND...                         anything else runs as is (the device check)
#
# Environment: MODEL_DIR (default|PATH), DECODE_INSTANCES, REASONING_INSTANCES,
# PREFILL_INSTANCES, MPS (auto|on|off), GPUS (default: what torch sees), RENDERED_REPOSITORY,
# MULTISTREAM_RUN_DIR; MULTISTREAM_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

if [[ $# -gt 0 && $1 != serve && $1 != -* ]]; then
  exec "$@"
fi
[[ ${1:-} == serve ]] && shift

REPO=${RENDERED_REPOSITORY:-/tmp/models}
export MULTISTREAM_RUN_DIR=${MULTISTREAM_RUN_DIR:-/tmp/multistream-run}
DRY=${MULTISTREAM_DRY_RUN:-0}
run() {
  if [[ $DRY == 1 ]]; then echo "+ $*"; else "$@"; fi
}

mkdir -p "$MULTISTREAM_RUN_DIR"
python3 -m launcher --render-only "$REPO" --kind KIND_GPU --model-dir "${MODEL_DIR:-default}" \
  --decode-instances "${DECODE_INSTANCES:-2}" --reasoning-instances "${REASONING_INSTANCES:-1}" \
  --prefill-instances "${PREFILL_INSTANCES:-1}" >&2

GPU_ARGS=()
[[ -n ${GPUS:-} ]] && GPU_ARGS=(--gpus "$GPUS")
eval "$(python3 -m launcher.gpu "$REPO" --format env "${GPU_ARGS[@]}")"
case ${MPS:-auto} in
  on) USE_MPS=1 ;;
  off) USE_MPS=0 ;;
  auto) USE_MPS=$MPS_NEEDED ;;
  *) echo "entrypoint: MPS must be auto, on or off, not '$MPS'" >&2; exit 2 ;;
esac
echo "entrypoint: instances per GPU $INSTANCES_PER_GPU, MPS $USE_MPS, $POOL_ARGS" >&2

MPS_STARTED=0
if [[ $USE_MPS == 1 ]]; then
  if [[ $DRY == 1 ]] || command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-$MULTISTREAM_RUN_DIR/mps-pipe}
    export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-$MULTISTREAM_RUN_DIR/mps-log}
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if run nvidia-cuda-mps-control -d; then
      MPS_STARTED=1
    else
      echo "entrypoint: the MPS daemon did not start: the instances sharing a GPU will take turns" >&2
    fi
  else
    echo "entrypoint: nvidia-cuda-mps-control not found: the instances sharing a GPU will take turns" >&2
  fi
fi

read -r -a POOL <<<"$POOL_ARGS"
CMD=(tritonserver --model-repository "$REPO" --allow-metrics true "${POOL[@]}" "$@")
if [[ $DRY == 1 ]]; then
  run "${CMD[@]}"
  [[ $MPS_STARTED == 1 ]] && run sh -c "echo quit | nvidia-cuda-mps-control"
  exit 0
fi

# tritonserver as a child, not exec: on the way out the MPS daemon is stopped too.
"${CMD[@]}" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
set +e
wait "$pid"
rc=$?
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid"
  rc=$?
done
if [[ $MPS_STARTED == 1 ]]; then
  echo quit | nvidia-cuda-mps-control || true
fi
exit "$rc"
