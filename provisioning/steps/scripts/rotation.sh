#!/usr/bin/env bash
# A host in and out of the load balancer's rotation (provisioning.rotation).
#
#   rotation.sh out FILE API_PORT PROBE_PATH     fail the probe on purpose; prints probe=CODE
#   rotation.sh in FILE API_PORT PROBE_PATH      pass it again;                prints probe=CODE
#   rotation.sh close-idle PID_FILE              graceful reload of the API proxy's nginx
#   rotation.sh inflight API_PORT VLLM_PORT      prints connections=N and busy=M
#   rotation.sh probe FILE API_PORT PROBE_PATH   prints out=yes|no probe=CODE
#
# The proxy answers PROBE_PATH 503 while FILE exists (serving.render.proxy). probe=CODE is what
# the load balancer would see on the API port (000 when nothing answers). close-idle makes
# nginx's old workers close idle keep-alive connections (the balancer keeps open flows on a
# host it took out) and finish the busy ones. inflight counts client connections on the API
# port and the requests vLLM is running or queueing (its /metrics on loopback).
set -euo pipefail

probe_code() {
    local port=$1 path=$2
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:${port}${path}" ||
        true
}

out() {
    local file=$1 port=$2 path=$3
    # Searchable by everyone: nginx's unprivileged workers test the file.
    install -d -m 0755 "$(dirname "$file")"
    touch "$file"
    chmod 0644 "$file"
    echo "probe=$(probe_code "$port" "$path")"
}

back_in() {
    local file=$1 port=$2 path=$3
    rm -f "$file"
    echo "probe=$(probe_code "$port" "$path")"
}

probe() {
    local file=$1 port=$2 path=$3
    if [[ -e $file ]]; then echo "out=yes"; else echo "out=no"; fi
    echo "probe=$(probe_code "$port" "$path")"
}

close_idle() {
    local pid_file=$1
    # SIGHUP is nginx's graceful reload (what the unit's reload does once the configuration
    # is checked; it is not changed here): new workers, old ones finish and close.
    kill -HUP "$(cat "$pid_file")"
}

inflight() {
    local api_port=$1 vllm_port=$2 connections busy
    connections=$(ss -Htn state established "( sport = :${api_port} )" | wc -l)
    busy=$(curl -s --max-time 5 "http://127.0.0.1:${vllm_port}/metrics" |
        awk '/^vllm:num_requests_(running|waiting)[{ ]/ { n += $NF } END { printf "%d", n }')
    echo "connections=${connections}"
    echo "busy=${busy:-0}"
}

case ${1:-} in
out) shift && out "$@" ;;
in) shift && back_in "$@" ;;
probe) shift && probe "$@" ;;
close-idle) shift && close_idle "$@" ;;
inflight) shift && inflight "$@" ;;
*)
    echo "usage: rotation.sh out|in|probe|close-idle|inflight ..." >&2
    exit 2
    ;;
esac
