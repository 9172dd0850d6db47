#!/usr/bin/env bash
# The VM metrics agent's package: the distribution's prometheus, its own units stopped.
#
#   metrics.sh probe PACKAGE PROMETHEUS UNIT READY_URL TIMER TOKEN_FILE DISTRIBUTION_UNIT...
#   metrics.sh install PACKAGE DISTRIBUTION_UNIT...
#   metrics.sh check PROMTOOL CONFIG
#   metrics.sh wait-ready READY_URL SECONDS
#
# probe prints key=value lines: version (the installed package's version, empty when it is
# not installed or its binary is missing), distro:UNIT (is-enabled of each unit the package
# brings: "masked" once this step has run), enabled and active (of the project's agent unit),
# ready (yes when the agent answers READY_URL on loopback), timer-enabled and timer-active (of
# the token refresher's timer), token (yes when TOKEN_FILE is there and not empty: its content
# is never read here) and hostname (the VM's name, the agent's instance label). install adds
# the package (or upgrades it to the archive's version) and masks the package's units:
# prometheus.service would run a full server on :9090 with the package's example
# configuration. check runs the package's promtool on the agent's file.
set -euo pipefail

installed_version() {
    local package=$1
    if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        dpkg-query -W -f='${Version}' "$package"
    fi
}

probe() {
    local package=$1 prometheus=$2 unit=$3 ready_url=$4 timer=$5 token_file=$6
    shift 6
    local version
    version=$(installed_version "$package")
    [[ -x $prometheus ]] || version=""
    echo "version=$version"
    local distro_unit
    for distro_unit in "$@"; do
        echo "distro:$distro_unit=$(systemctl is-enabled "$distro_unit" 2>/dev/null || true)"
    done
    echo "enabled=$(systemctl is-enabled "$unit" 2>/dev/null || true)"
    echo "active=$(systemctl is-active "$unit" 2>/dev/null || true)"
    if curl -fsS --max-time 5 -o /dev/null "$ready_url" 2>/dev/null; then
        echo "ready=yes"
    else
        echo "ready=no"
    fi
    echo "timer-enabled=$(systemctl is-enabled "$timer" 2>/dev/null || true)"
    echo "timer-active=$(systemctl is-active "$timer" 2>/dev/null || true)"
    if [[ -s $token_file ]]; then
        echo "token=yes"
    else
        echo "token=no"
    fi
    echo "hostname=$(hostname)"
}

install() {
    local package=$1
    shift
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Installs it, or upgrades an installed one to the archive's version; recommends
    # (node-exporter) stay out.
    apt-get install -y -qq --no-install-recommends "$package" >/dev/null
    local distro_unit
    for distro_unit in "$@"; do
        # Masked, not only disabled: a package upgrade (or a later install of a unit that is
        # not there yet) must not start it again.
        systemctl mask --now "$distro_unit" >/dev/null 2>&1 ||
            systemctl mask "$distro_unit" >/dev/null
    done
    echo "version=$(installed_version "$package")"
}

check() {
    local promtool=$1 config=$2
    "$promtool" check config --agent "$config"
}

wait_ready() {
    local ready_url=$1 seconds=$2
    local deadline=$((SECONDS + seconds))
    until curl -fsS --max-time 5 -o /dev/null "$ready_url" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "not ready at $ready_url after ${seconds}s" >&2
            exit 1
        fi
        sleep 1
    done
}

case ${1:-} in
probe) shift && probe "$@" ;;
install) shift && install "$@" ;;
check) shift && check "$@" ;;
wait-ready) shift && wait_ready "$@" ;;
*)
    echo "usage: metrics.sh probe|install|check|wait-ready ..." >&2
    exit 2
    ;;
esac
