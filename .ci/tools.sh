#!/usr/bin/env bash
# Installs the third-party checkers that judge the rendered artifacts: the Debian packages
# that bring shellcheck, systemd-analyze and promtool, and checkov (own venv: it pins a lot).
set -euo pipefail
tools_venv=${1:-.venv-tools}
need=()
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v promtool >/dev/null || need+=(prometheus)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m venv "$tools_venv"
"$tools_venv/bin/pip" install -q "checkov==3.3.30"
