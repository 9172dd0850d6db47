#!/usr/bin/env bash
# The metrics agent's bearer token: the VM's managed identity's, from the instance metadata
# service (IMDS), renamed into place so that Prometheus (which reads the file on every request)
# sees either the old token or the new one, never a part.
#
#   metrics-token.sh IMDS_TOKEN_URL RESOURCE CLIENT_ID TOKEN_FILE
#
# IMDS_TOKEN_URL is IMDS's token endpoint with its api-version; RESOURCE the audience (Azure
# Monitor's ingestion); CLIENT_ID the user-assigned identity's client id. IMDS answers JSON with
# access_token and expires_on (epoch seconds, as a string). Installed on the VM as
# /usr/local/libexec/exaone-vllm-metrics-token and run by exaone-vllm-metrics-token.service.
#
# On success it prints the token's expiry, never the token. On any failure (IMDS unreachable,
# an error status, an answer without a token or with one already expired) it leaves TOKEN_FILE
# as it was, says why on stderr (the journal) and exits 1: the previous token stays in use.
# Needs bash, curl and python3 (for the JSON), which Ubuntu's server images have.
set -euo pipefail

if (($# != 4)); then
    echo "usage: metrics-token.sh IMDS_TOKEN_URL RESOURCE CLIENT_ID TOKEN_FILE" >&2
    exit 2
fi
imds_url=$1 resource=$2 client_id=$3 token_file=$4
folder=$(dirname "$token_file")

kept() {
    # What the agent keeps using: the previous token's expiry, read from its sidecar file.
    local expiry
    if [[ -s $token_file ]] && expiry=$(cat "$token_file.expires_on" 2>/dev/null); then
        echo "the previous token stays in use (it expires $(date -u -d "@$expiry" +%FT%TZ))"
    else
        echo "there is no previous token: the agent cannot write until a refresh succeeds"
    fi
}

fail() {
    echo "metrics token: $1; $(kept)" >&2
    exit 1
}

umask 077
# Both files live beside the token (a folder only this user reads), so the rename is atomic
# and the answer, which holds the token, never lands anywhere else.
answer=$(mktemp "$folder/.answer.XXXXXX")
fresh=$(mktemp "$folder/.token.XXXXXX")
errors=$(mktemp "$folder/.errors.XXXXXX")
trap 'rm -f "$answer" "$fresh" "$errors"' EXIT

# --noproxy: IMDS must never be asked through a proxy (it refuses, and the token would pass
# through it). Retries cover IMDS's brief unavailability (and its 429s) at boot.
if ! status=$(curl --silent --show-error --noproxy '*' --max-time 10 \
    --retry 3 --retry-delay 2 --retry-connrefused \
    --header 'Metadata: true' --get \
    --data-urlencode "resource=$resource" --data-urlencode "client_id=$client_id" \
    --output "$answer" --write-out '%{http_code}' "$imds_url" 2>"$errors"); then
    fail "the instance metadata service did not answer at $imds_url: $(tail -n 1 "$errors")"
fi
if [[ $status != 200 ]]; then
    # An error answer holds no token: its error fields say what IMDS refused.
    fail "the instance metadata service answered HTTP $status: $(head -c 300 "$answer" |
        tr '\n' ' ')"
fi

# The JSON is read by python3, which writes the token straight into the fresh file and prints
# only its expiry: the token is never in a command line, a variable or the output.
expires_on=$(python3 - "$answer" "$fresh" <<'PYTHON'
import json
import re
import sys
import time

answer, fresh = sys.argv[1], sys.argv[2]
try:
    with open(answer, encoding="utf-8") as f:
        doc = json.load(f)
except (OSError, ValueError) as e:
    sys.exit(f"the answer is not JSON ({type(e).__name__})")
if not isinstance(doc, dict):
    sys.exit("the answer is not a JSON object")
token = doc.get("access_token")
if not isinstance(token, str) or not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", token):
    sys.exit("the answer has no usable access_token")
try:
    expires_on = int(str(doc.get("expires_on")))
except ValueError:
    sys.exit("the answer has no expires_on (epoch seconds)")
if expires_on <= time.time():
    sys.exit(f"the answer's token expired already (expires_on {expires_on})")
with open(fresh, "w", encoding="ascii") as f:
    f.write(token)
print(expires_on)
PYTHON
) || fail "the instance metadata service's answer is unusable"

mv -f "$fresh" "$token_file"
printf '%s\n' "$expires_on" >"$token_file.expires_on"
echo "metrics token refreshed; it expires $(date -u -d "@$expires_on" +%FT%TZ)"
