#!/usr/bin/env bash
# The VM's local NVMe disk as the models folder (useLocalNvme).
#
#   nvme.sh probe MOUNTPOINT   mounted=yes|no, disk=/dev/... or none
#   nvme.sh apply MOUNTPOINT   format (only a disk without a file system) and mount it
#
# NC H100 v5 VMs have local NVMe "Microsoft NVMe Direct Disk" devices whose content is lost
# when the VM is deallocated: the mount is re-made and the model re-fetched by the next
# deploy. The fstab entry uses nofail, so a deallocated-then-started VM still boots.
set -euo pipefail

local_disk() {
    local dev model
    for dev in /sys/block/nvme*n1; do
        [[ -e $dev ]] || continue
        model=$(tr -s ' ' <"$dev/device/model" 2>/dev/null || true)
        if [[ $model == *"NVMe Direct Disk"* ]]; then
            echo "/dev/${dev##*/}"
            return
        fi
    done
    echo none
}

probe() {
    local mnt=$1
    if mountpoint -q "$mnt"; then echo mounted=yes; else echo mounted=no; fi
    echo "disk=$(local_disk)"
}

apply() {
    local mnt=$1 disk
    disk=$(local_disk)
    if [[ $disk == none ]]; then
        echo "no local NVMe disk found; set useLocalNvme: false for this VM size" >&2
        exit 3
    fi
    if ! blkid "$disk" >/dev/null 2>&1; then
        mkfs.ext4 -q -L exaone-models "$disk"
    fi
    install -d -m 0755 "$mnt"
    if ! grep -q "LABEL=exaone-models" /etc/fstab; then
        echo "LABEL=exaone-models $mnt ext4 defaults,nofail,noatime 0 2" >>/etc/fstab
    fi
    mountpoint -q "$mnt" || mount "$mnt"
    chmod 0755 "$mnt"
}

case ${1:-} in
probe) probe "${2:?mountpoint}" ;;
apply) apply "${2:?mountpoint}" ;;
*)
    echo "usage: nvme.sh probe|apply MOUNTPOINT" >&2
    exit 2
    ;;
esac
