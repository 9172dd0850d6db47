#!/usr/bin/env bash
# Init container of the vLLM pod: fetches the base model (when it lives in Blob storage) and
# every adapter of the spec, and verifies each adapter's folder digest before vLLM starts.
#
# Usage: fetch-adapters.sh MANIFEST
#        fetch-adapters.sh digest FOLDER    (prints the folder digest)
#
# MANIFEST has one tab-separated line per item: KIND SOURCE DESTINATION SHA256
#   KIND is model or adapter; SOURCE is blob://container/path or hf://org/repo@rev;
#   SHA256 is the adapter's folder digest, or - for none.
# Blob access uses the pod's workload identity: the AKS webhook injects AZURE_CLIENT_ID,
# AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE. STORAGE_ACCOUNT names the account.
#
# Folder digest: for every regular file under the folder, the line "<sha256 hex>  <relative
# path>\n"; lines sorted by relative path in byte order; the sha256 of their concatenation.
set -euo pipefail
shopt -s inherit_errexit

log() { printf 'fetch: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Relative paths of the regular files under the current directory, NUL-terminated, in byte
# order. Bash's globstar keeps this to builtins plus sort. Symlinks are refused, not followed
# (one could point the digest outside the folder), and so are names with a backslash or a
# line break (sha256sum would escape them), as in serving/stack/digest.py.
regular_files() {
  shopt -s globstar dotglob nullglob
  local path
  for path in **; do
    [[ ! -L $path ]] || die "$path is a symlink; a digest follows no links"
    [[ $path != *[$'\\\n\r']* ]] || die "$path: file names with \\ or line breaks are refused"
    if [[ -f $path ]]; then
      printf '%s\0' "$path"
    fi
  done | LC_ALL=C sort -z
}

# The sha256sum-style listing of the current directory, one line per regular file.
file_listing() {
  local path sum
  regular_files | while IFS= read -r -d '' path; do
    sum=$(sha256sum < "$path")
    printf '%s  %s\n' "${sum%% *}" "$path"
  done
}

folder_digest() {
  local folder=$1 listing
  [[ -d $folder && ! -L $folder ]] || die "$folder is not a folder"
  # Listed in full first: a refused name must fail the digest, not hash a partial listing.
  listing=$(cd "$folder" && file_listing) || die "cannot digest $folder"
  # $(...) dropped the last line's newline; an empty folder hashes the empty text.
  if [[ -n $listing ]]; then printf '%s\n' "$listing"; fi | sha256sum | cut -d' ' -f1
}

login() {
  : "${AZURE_CLIENT_ID:?is not set: is the pod labelled azure.workload.identity/use=true?}"
  : "${AZURE_TENANT_ID:?is not set by the workload identity webhook}"
  : "${AZURE_FEDERATED_TOKEN_FILE:?is not set by the workload identity webhook}"
  : "${STORAGE_ACCOUNT:?names the storage account that holds the model and adapters}"
  log "logging in as workload identity $AZURE_CLIENT_ID"
  az login --service-principal --username "$AZURE_CLIENT_ID" --tenant "$AZURE_TENANT_ID" \
    --federated-token "$(< "$AZURE_FEDERATED_TOKEN_FILE")" \
    --allow-no-subscriptions --output none
}

# Downloads every blob under blob://container/prefix into STAGING/prefix.
fetch_blob() {
  local source=$1 staging=$2 rest container prefix
  rest=${source#blob://}
  container=${rest%%/*}
  prefix=${rest#*/}
  prefix=${prefix%/}
  [[ -n $container && -n $prefix && $rest == */* ]] || die "$source is not blob://container/path"
  az storage blob download-batch --account-name "$STORAGE_ACCOUNT" --auth-mode login \
    --source "$container" --pattern "$prefix/*" --destination "$staging" \
    --no-progress --output none
  [[ -d $staging/$prefix ]] || die "no blobs under $source"
  mv "$staging/$prefix" "$staging/.fetched"
}

# Downloads a public Hugging Face repo at a pinned commit into STAGING/.fetched.
fetch_hf() {
  local source=$1 staging=$2 rest
  rest=${source#hf://}
  [[ $rest == */*@* ]] || die "$source is not hf://org/repo@revision"
  python3 - "${rest%@*}" "${rest##*@}" "$staging/.fetched" <<'PY'
import json, os, shutil, sys, urllib.parse, urllib.request

repo, rev, out = sys.argv[1:4]
hub = "https://huggingface.co"
with urllib.request.urlopen(f"{hub}/api/models/{repo}/tree/{rev}?recursive=True", timeout=60) as r:
    entries = json.load(r)
for entry in entries:
    path = entry["path"]
    if entry.get("type") != "file":
        continue
    if path.startswith("/") or ".." in path.split("/"):
        sys.exit(f"fetch: error: unsafe path {path!r} in {repo}")
    dest = os.path.join(out, path)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    url = f"{hub}/{repo}/resolve/{rev}/{urllib.parse.quote(path)}"
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)
PY
}

# Fetches SOURCE into DESTINATION through a staging folder on the same volume, so a folder at
# DESTINATION is always complete (the init container may run again in the same pod).
fetch() {
  local source=$1 destination=$2 parent staging
  parent=$(dirname "$destination")
  mkdir -p "$parent"
  staging=$(mktemp -d "$parent/.staging.XXXXXX")
  case $source in
    blob://*) fetch_blob "$source" "$staging" ;;
    hf://*) fetch_hf "$source" "$staging" ;;
    *) die "$source: unknown scheme; allowed: blob://container/path, hf://org/repo@rev" ;;
  esac
  rm -rf "$destination"
  mv "$staging/.fetched" "$destination"
  rm -rf "$staging"
}

verify() {
  local folder=$1 want=$2 got
  got=$(folder_digest "$folder")
  if [[ $got != "$want" ]]; then
    die "digest mismatch for $folder: expected $want, got $got"
  fi
  log "verified $folder ($got)"
}

run() {
  local manifest=$1 kind source destination sha256 logged_in=0
  [[ -r $manifest ]] || die "cannot read manifest $manifest"
  while IFS=$'\t' read -r kind source destination sha256; do
    [[ -n $kind ]] || continue
    if [[ $kind == adapter && -d $destination ]] \
      && [[ $(folder_digest "$destination") == "$sha256" ]]; then
      log "$destination is present and verified"
      continue
    fi
    if [[ $kind == model && -d $destination ]]; then
      log "$destination is present"
      continue
    fi
    if [[ $source == blob://* && $logged_in == 0 ]]; then
      login
      logged_in=1
    fi
    log "fetching $source into $destination"
    fetch "$source" "$destination"
    case $kind in
      model) ;;
      adapter)
        [[ $sha256 =~ ^[0-9a-f]{64}$ ]] || die "adapter $destination has no sha256 to verify"
        verify "$destination" "$sha256"
        ;;
      *) die "unknown kind $kind in $manifest" ;;
    esac
  done < "$manifest"
  log "done"
}

main() {
  case ${1:-} in
    digest)
      [[ $# -eq 2 ]] || die "usage: $0 digest FOLDER"
      folder_digest "$2"
      ;;
    "") die "usage: $0 MANIFEST | $0 digest FOLDER" ;;
    *) run "$1" ;;
  esac
}

main "$@"
