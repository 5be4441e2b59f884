#!/usr/bin/env bash
# Boots the keyshard guest under cloud-hypervisor, with the same pieces as run-qemu.sh: the
# initramfs from images/, the LUKS2 volume as a virtio-blk disk with serial ks-volume, one
# vhost-user-blk fragment device per `vhost-keyshard` socket, and the VM's broker mailbox
# (`keyshard coordinator --broker VMID=SOCKET`) when the manifest has tpm or sev holders.
#
# Usage:
#   qemu-configs/cloud-hypervisor.sh --kernel VMLINUX --initrd FILE --volume IMG
#                                    [--fragment-socket SOCKET]... [--broker-socket SOCKET]
#                                    [--memory MIB] [--dry-run]
#
#   --dry-run prints the command line, one argument per line.
#
# Not run by the tests: cloud-hypervisor needs KVM (or MSHV), which these machines lack, and
# bookworm does not package it. What the command line relies on:
#   --memory ...,shared=on       vhost-user devices map guest RAM: it must be shared memory
#                                (QEMU: memory-backend-memfd,share=on).
#   --disk vhost_user=true,socket=PATH,num_queues=1
#                                one fragment device; its serial (ksf-<holder id>) and its
#                                read-only flag come from vhost-keyshard itself.
#                                num_queues=1 matches what vhost-keyshard serves.
#   --disk vhost_user=true,socket=BROKER,num_queues=1
#                                the broker mailbox (serial ksb-<vm id>), attached the same way;
#                                it is writable because the coordinator does not offer
#                                VIRTIO_BLK_F_RO (no readonly= on vhost-user disks).
#   --disk path=IMG,readonly=on,serial=ks-volume
#                                the LUKS2 volume, found by images/init.sh through its serial.
#   --kernel                     cloud-hypervisor boots an uncompressed ELF vmlinux (PVH entry;
#                                the Debian cloud kernel has CONFIG_PVH=y), not the bzImage in
#                                /boot: extract it with the kernel tree's scripts/extract-vmlinux.
# Unlike QEMU's reconnect=1, cloud-hypervisor does not reconnect to a device that restarts.
# SEV-SNP: the devices offer VIRTIO_F_ACCESS_PLATFORM; this script sets nothing for it
# (cloud-hypervisor's iommu=on means its virtual IOMMU, whose IOTLB the devices do not serve),
# and cloud-hypervisor's SEV-SNP support (MSHV) is not checked here.
# qemu-configs/check-configs.sh checks the --dry-run output against cloud-hypervisor's
# documented options (make check-configs).
#
# Environment: KEYSHARD_CLOUD_HYPERVISOR (binary, default cloud-hypervisor).
set -euo pipefail

die() { echo "cloud-hypervisor.sh: $*" >&2; exit 1; }
usage() { sed -n '/^# Usage:/,/^# Not run/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

kernel='' initrd='' volume='' memory=512 dry_run=0
sockets=() broker=''
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) kernel=${2:?}; shift 2 ;;
        --initrd) initrd=${2:?}; shift 2 ;;
        --volume) volume=${2:?}; shift 2 ;;
        --fragment-socket) sockets+=("${2:?}"); shift 2 ;;
        --broker-socket)
            [ -z "$broker" ] || die "--broker-socket given twice: a VM has one broker mailbox"
            broker=${2:?}; shift 2 ;;
        --memory) memory=${2:?}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage ;;
        *) echo "cloud-hypervisor.sh: unknown argument $1" >&2; usage ;;
    esac
done
if [ -z "$kernel" ] || [ -z "$initrd" ] || [ -z "$volume" ]; then usage; fi
[[ "$memory" =~ ^[0-9]+$ ]] || die "--memory takes MiB"
for path in "$kernel" "$initrd" "$volume" "${sockets[@]}" ${broker:+"$broker"}; do
    [[ "$path" != *,* ]] || die "cloud-hypervisor options cannot take a path with a comma: $path"
done

disks=("path=$volume,readonly=on,serial=ks-volume")
for socket in "${sockets[@]}"; do
    disks+=("vhost_user=true,socket=$socket,num_queues=1,queue_size=128")
done
# The broker mailbox: the guest writes its requests for tpm/sev shares here.
[ -z "$broker" ] || disks+=("vhost_user=true,socket=$broker,num_queues=1,queue_size=128")

args=(
    --cpus boot=1
    --memory "size=${memory}M,shared=on"
    --kernel "$kernel"
    --initramfs "$initrd"
    --cmdline "console=ttyS0 panic=-1 loglevel=4"
    --disk "${disks[@]}"
    --serial tty
    --console off
)

ch=${KEYSHARD_CLOUD_HYPERVISOR:-cloud-hypervisor}
if [ "$dry_run" = 1 ]; then
    printf '%s\n' "$ch" "${args[@]}"
    exit 0
fi
exec "$ch" "${args[@]}"
