#!/usr/bin/env bash
# The main job. With no arguments: set up, make the synthetic shards, fine-tune the tiny teacher,
# train the contrastive baseline, distill the student with DCD on 2 ranks under DeepSpeed, evaluate
# student / teacher / rerank, benchmark retrieval speed, and write runs/<run>/results.{md,json}.
# Steps already done are skipped; --fresh redoes them.
#
#   ./launch.sh                         the whole default pipeline
#   ./launch.sh --fast                  the same on tiny sizes (CI: a few minutes)
#   ./launch.sh --fresh                 redo every step
#   ./launch.sh --stage distill --weighting wsl    one training stage; arguments go to train/run.py
#   ./launch.sh --ranks 4 ...           CPU processes (default 2; on CUDA every GPU is used)
#   ./launch.sh --hostfile hosts --num_nodes 2 --stage distill ...   multi-node (deepspeed launcher)
#   ./launch.sh --tensorboard           also start TensorBoard on 127.0.0.1:6006
#   ./launch.sh --signals stored        DCD from one stored scoring pass (online | stored | auto, the
#                                       default; --signal-costs FILE: auto weighs a benchmark's numbers)
set -euo pipefail
cd "$(dirname "$0")"
REPO="$(pwd)"

RUN_NAME=default FRESH=0 FAST=0 RANKS=2 TENSORBOARD=0 TB_PORT=6006
LAUNCHER_ARGS=() TRAIN_ARGS=() PIPELINE_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fresh) FRESH=1 ;;
    --fast) FAST=1 ;;
    --run) RUN_NAME="$2"; shift ;;
    --ranks) RANKS="$2"; shift ;;
    --tensorboard) TENSORBOARD=1 ;;
    --tensorboard-port) TB_PORT="$2"; shift ;;
    --signals|--signal-costs) PIPELINE_ARGS+=("$1" "$2"); shift ;;
    # The deepspeed launcher's own multi-node options (docs/scale_out.md), --a-b spelled --a_b for it.
    --hostfile|--num_nodes|--num-nodes|--master_addr|--master-addr|--master_port|--master-port|\
    --include|--exclude|--launcher|--launcher_args|--launcher-args|--ssh_port|--ssh-port|\
    --node_rank|--node-rank|--venv_script|--venv-script)
      flag="${1#--}"; LAUNCHER_ARGS+=("--${flag//-/_}" "$2"); shift ;;
    --no_ssh|--no-ssh|--no_ssh_check|--no-ssh-check|--force_multi|--force-multi)
      flag="${1#--}"; LAUNCHER_ARGS+=("--${flag//-/_}") ;;
    --help|-h) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) TRAIN_ARGS+=("$1") ;;
  esac
  shift
done

source scripts/setup.sh

# CPU ranks: split the cores between them, one OpenMP thread pool each (PLATFORM_NOTES: 2 threads per
# rank on 2 cores made a small model 10x slower). On CUDA, the launcher uses every GPU by default.
# $DEEPSPEED: the launcher executable (default: the venv's `deepspeed`; tests put a recorder here).
DEEPSPEED_BIN="${DEEPSPEED:-deepspeed}"
HAS_CUDA=$(python -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_CUDA" = "1" ]; then
  DS_LAUNCH=("$DEEPSPEED_BIN" "${LAUNCHER_ARGS[@]}")
else
  CORES=$(nproc)
  export OMP_NUM_THREADS=$(( CORES / RANKS > 0 ? CORES / RANKS : 1 ))
  DS_LAUNCH=("$DEEPSPEED_BIN" --num_gpus "$RANKS" "${LAUNCHER_ARGS[@]}")
fi

if [ "$TENSORBOARD" = "1" ]; then
  mkdir -p runs
  # Loopback only: a training dashboard is nobody else's business.
  tensorboard --logdir runs --host 127.0.0.1 --port "$TB_PORT" >/dev/null 2>&1 &
  echo "[launch] TensorBoard on http://127.0.0.1:$TB_PORT (pid $!)"
fi

if [ ${#TRAIN_ARGS[@]} -gt 0 ] && [ ${#PIPELINE_ARGS[@]} -gt 0 ]; then
  echo "error: ${PIPELINE_ARGS[0]} is the pipeline's; one stage reads stored signals with --teacher-signals PATH" >&2
  exit 2
fi
if [ ${#TRAIN_ARGS[@]} -gt 0 ]; then
  # One stage, as users type it: everything else goes to train/run.py. Bad flags, configs or data
  # are reported in one line here, before the launcher spawns any rank.
  if [ -f train/preflight.py ]; then python -m train.preflight --no-warnings --ranks "$RANKS" "${TRAIN_ARGS[@]}"; fi
  exec "${DS_LAUNCH[@]}" train/run.py "${TRAIN_ARGS[@]}"
fi

exec python tools/pipeline.py --run "runs/$RUN_NAME" --ranks "$RANKS" \
  $( [ "$FRESH" = 1 ] && echo --fresh ) $( [ "$FAST" = 1 ] && echo --fast ) \
  --launcher "${DS_LAUNCH[*]}" "${PIPELINE_ARGS[@]}"
