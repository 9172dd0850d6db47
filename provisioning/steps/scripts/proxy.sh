#!/usr/bin/env bash
# The API proxy's package on a VM: nginx from the distribution, its own unit stopped.
#
#   proxy.sh probe PACKAGE NGINX DISTRIBUTION_UNIT UNIT
#   proxy.sh install PACKAGE DISTRIBUTION_UNIT
#
# probe prints key=value lines: package (yes/no: installed and its binary present), distro
# (is-enabled of the distribution's unit: "masked" once this step has run), enabled and
# active (of the project's proxy unit). install adds the package and masks the distribution's
# unit, which the package starts on port 80 with its default site: the project's unit runs
# nginx on the rendered configuration instead.
set -euo pipefail

probe() {
    local package=$1 nginx=$2 distro_unit=$3 unit=$4
    if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" &&
        [[ -x $nginx ]]; then
        echo "package=yes"
    else
        echo "package=no"
    fi
    echo "distro=$(systemctl is-enabled "$distro_unit" 2>/dev/null || true)"
    echo "enabled=$(systemctl is-enabled "$unit" 2>/dev/null || true)"
    echo "active=$(systemctl is-active "$unit" 2>/dev/null || true)"
}

install() {
    local package=$1 distro_unit=$2
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"
    then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "$package" >/dev/null
    fi
    # Masked, not only disabled: a package upgrade must not start it again.
    systemctl mask --now "$distro_unit" >/dev/null 2>&1 ||
        systemctl mask "$distro_unit" >/dev/null
}

case ${1:-} in
probe) shift && probe "$@" ;;
install) shift && install "$@" ;;
*)
    echo "usage: proxy.sh probe|install ..." >&2
    exit 2
    ;;
esac
