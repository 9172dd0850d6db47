#!/usr/bin/env bash
# Installs the third-party checkers that judge the rendered artifacts: the Debian packages
# that bring shellcheck, systemd-analyze, promtool, npm, debootstrap, systemd-nspawn and nginx, checkov (own venv: it pins a lot),
# and Azurite from npm for the integration tests.
set -euo pipefail
tools_venv=${1:-.venv-tools}
need=()
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v promtool >/dev/null || need+=(prometheus)
command -v npm >/dev/null || need+=(npm)
# The fab deploy integration tests boot a Debian rootfs with systemd-nspawn.
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
# nginx, the API proxy: `nginx -t` on its rendered configuration, and a real one in front of
# vLLM in the integration tests (in /usr/sbin, which a non-root PATH may lack).
[[ -x /usr/sbin/nginx ]] || need+=(nginx)
# The rolling-fleet test: HAProxy probing /health like Azure's load balancer, systemd test
# hosts each in its own network namespace (iproute2: netns, veth) reaching the package
# mirrors through NAT (iptables), fab's SSH to them.
[[ -x /usr/sbin/haproxy ]] || need+=(haproxy)
command -v ip >/dev/null || need+=(iproute2)
[[ -x /usr/sbin/iptables ]] || need+=(iptables)
command -v curl >/dev/null || need+=(curl)
command -v sudo >/dev/null || need+=(sudo)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m venv "$tools_venv"
"$tools_venv/bin/pip" install -q "checkov==3.3.30"
# Azurite (Blob emulator) for the integration tests, in a project-local npm prefix.
azurite_version=3.37.0
node_prefix="$tools_venv/node"
installed=$(node -p 'require(require("path").resolve(process.argv[1])).version' \
  "$node_prefix/node_modules/azurite/package.json" 2>/dev/null || true)
if [[ $installed != "$azurite_version" ]]; then
  npm install --silent --no-audit --no-fund --prefix "$node_prefix" "azurite@$azurite_version"
fi
