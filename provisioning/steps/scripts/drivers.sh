#!/usr/bin/env bash
# NVIDIA drivers on an NC H100 v5 VM.
#
#   drivers.sh probe           key=value lines: gpus, smi, smi_gpus, secure_boot, hpc, reboot
#   drivers.sh install BRANCH  the Canonical-signed server driver and its utils
#
# Canonical signs the modules that `ubuntu-drivers` installs, so they load under Secure Boot
# (Trusted Launch); a DKMS build would not. Hopper uses NVIDIA's open kernel modules by
# default. The NVL PCIe cards of NC H100 v5 need no Fabric Manager.
set -euo pipefail

probe() {
    local gpus=-1 smi=0 smi_gpus=0 sb=unknown hpc=0 reboot=no out
    if command -v lspci >/dev/null 2>&1; then
        # `lspci -n -d 10de:` prints "slot class: vendor:device"; 0302 is a 3D controller
        # (H100), 0300 a VGA controller.
        gpus=$(lspci -n -d 10de: | awk '$2 == "0302:" || $2 == "0300:"' | wc -l)
    fi
    if command -v nvidia-smi >/dev/null 2>&1 &&
        out=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null); then
        smi=1
        smi_gpus=$(grep -c . <<<"$out" || true)
    fi
    if command -v mokutil >/dev/null 2>&1; then
        if mokutil --sb-state 2>/dev/null | grep -q enabled; then sb=enabled; else sb=disabled; fi
    fi
    # The Azure HPC images (microsoft-dsvm:ubuntu-hpc) ship drivers under /opt/azurehpc.
    [[ -d /opt/azurehpc ]] && hpc=1
    [[ -f /var/run/reboot-required ]] && reboot=yes
    printf 'gpus=%s\nsmi=%s\nsmi_gpus=%s\nsecure_boot=%s\nhpc=%s\nreboot=%s\n' \
        "$gpus" "$smi" "$smi_gpus" "$sb" "$hpc" "$reboot"
}

install_driver() {
    local branch=$1
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq ubuntu-drivers-common >/dev/null
    ubuntu-drivers install --gpgpu "nvidia:${branch}-server"
    apt-get install -y -qq "nvidia-utils-${branch}-server" >/dev/null
}

case ${1:-} in
probe) probe ;;
install) install_driver "${2:?usage: drivers.sh install BRANCH}" ;;
*)
    echo "usage: drivers.sh probe | install BRANCH" >&2
    exit 2
    ;;
esac
