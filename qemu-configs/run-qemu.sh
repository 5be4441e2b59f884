#!/usr/bin/env bash
# Boots a keyshard guest under QEMU: the kernel and initramfs from images/, the LUKS2 volume as a
# plain virtio-blk disk found by its serial, one vhost-user-blk device per fragment socket (each
# served by `vhost-keyshard --socket-path SOCKET --fragment FILE`) and, when the manifest has
# tpm or sev holders, the VM's broker mailbox (served by `keyshard coordinator --broker
# VMID=SOCKET`), through which the guest asks the coordinator for them. The serial console is
# this script's stdout; the VM ends when the guest powers off (-no-reboot), so this script returns
# when the guest is done. The e2e tests (tests/) run exactly this script.
#
# Usage:
#   qemu-configs/run-qemu.sh --kernel FILE --initrd FILE --volume IMG
#                            [--fragment-socket SOCKET]... [--broker-socket SOCKET]
#                            [--volume-serial SERIAL]
#                            [--memory MIB] [--append 'KERNEL ARGS'] [--dry-run]
#
#   --fragment-socket  a vhost-keyshard socket; repeat for each fragment device. A socket that
#                      does not accept connections is left out (with a note on stderr), so a
#                      stopped holder does not block the boot; the guest then reports it missing.
#                      KEYSHARD_MISSING_FRAGMENT=fail refuses to boot instead.
#   --broker-socket    the VM's broker mailbox socket (`keyshard coordinator --broker
#                      VMID=SOCKET`; the guest sees serial ksb-VMID), at most one. It is
#                      attached the same way but writable: the guest writes its requests to it.
#                      A socket that does not accept connections is left out like a fragment
#                      socket (the guest then reports its tpm/sev holders missing), or refused
#                      with KEYSHARD_MISSING_FRAGMENT=fail.
#   --volume-serial    the volume disk's virtio-blk serial (default ks-volume, what init.sh seeks)
#   --memory           guest RAM in MiB (default 512)
#   --append           extra kernel command line (e.g. keyshard.watchdog=60)
#   --dry-run          print the QEMU command line, one argument per line, and exit
#
# Environment:
#   KEYSHARD_ACCEL     QEMU accelerator (default tcg; e.g. kvm where /dev/kvm works)
#   KEYSHARD_QEMU      QEMU binary (default qemu-system-x86_64)
#   KEYSHARD_CPU       -cpu model (default max: it has RDRAND, so the guest's RNG is ready at
#                      once; with qemu64 the first cryptsetup open waits about 1.2 s for entropy)
#   KEYSHARD_QEMU_EXTRA_ARGS  extra QEMU arguments, split on spaces (e.g. '-L /path/to/firmware')
#   KEYSHARD_IOMMU_PLATFORM   on: every virtio device (the volume, the fragment devices, the
#                      broker) gets iommu_platform=on,disable-legacy=on, so the guest negotiates
#                      VIRTIO_F_ACCESS_PLATFORM (bit 33), which SEV and SEV-SNP guest kernels
#                      require of every virtio device. No vIOMMU is added: addresses stay
#                      guest-physical. Default off (a plain guest does not need it). An SEV-SNP
#                      launch also needs KVM, OVMF and -object sev-snp-guest, which this script
#                      does not set up.
#
# Works with QEMU 7.2 (Debian bookworm's qemu-system-x86) and later: every option used here
# exists in 7.2.
set -euo pipefail

die() { echo "run-qemu: $*" >&2; exit 1; }
usage() { sed -n '/^# Usage:/,/^# Environment:/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

kernel='' initrd='' volume='' volume_serial=ks-volume memory=512 append='' dry_run=0
sockets=() broker=''
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) kernel=${2:?}; shift 2 ;;
        --initrd) initrd=${2:?}; shift 2 ;;
        --volume) volume=${2:?}; shift 2 ;;
        --volume-serial) volume_serial=${2:?}; shift 2 ;;
        --fragment-socket) sockets+=("${2:?}"); shift 2 ;;
        --broker-socket)
            [ -z "$broker" ] || die "--broker-socket given twice: a VM has one broker mailbox"
            broker=${2:?}; shift 2 ;;
        --memory) memory=${2:?}; shift 2 ;;
        --append) append=${2?}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage ;;
        *) echo "run-qemu: unknown argument $1" >&2; usage ;;
    esac
done
if [ -z "$kernel" ] || [ -z "$initrd" ] || [ -z "$volume" ]; then usage; fi
[[ "$memory" =~ ^[0-9]+$ ]] || die "--memory takes MiB"
# virtio-blk serials are at most 20 bytes; QEMU's property takes no commas unescaped.
[[ "$volume_serial" =~ ^[A-Za-z0-9._-]{1,20}$ ]] || die "--volume-serial: 1..20 of A-Z a-z 0-9 . _ -"
for path in "$kernel" "$initrd" "$volume"; do
    [ -f "$path" ] || die "no such file: $path"
    [[ "$path" != *,* ]] || die "QEMU options cannot take a path with a comma: $path"
done

accel=${KEYSHARD_ACCEL:-tcg}
# Appended to every virtio device: see KEYSHARD_IOMMU_PLATFORM above. iommu_platform needs a
# modern-only device (QEMU: "VIRTIO_F_IOMMU_PLATFORM was supported by neither legacy nor
# transitional device"), hence disable-legacy=on.
case "${KEYSHARD_IOMMU_PLATFORM:-off}" in
    on) virtio_opts=,iommu_platform=on,disable-legacy=on ;;
    off) virtio_opts= ;;
    *) die "KEYSHARD_IOMMU_PLATFORM is on or off, not ${KEYSHARD_IOMMU_PLATFORM}" ;;
esac
qemu=${KEYSHARD_QEMU:-qemu-system-x86_64}
cpu=${KEYSHARD_CPU:-max}

# True when something accepts connections on the UNIX socket $1. vhost-keyshard serves one
# frontend after another, so a probe connection that closes at once does no harm.
socket_accepts() {
    [ -S "$1" ] || return 1
    command -v python3 >/dev/null || return 0   # no way to probe: trust the socket file
    python3 - "$1" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(2)
s.connect(sys.argv[1])
s.close()
EOF
}

args=(
    -accel "$accel"
    -cpu "$cpu"
    -smp 1
    -m "${memory}M"
    # vhost-user devices map guest RAM into their own process: it must be a shared memfd.
    # memory-backend= on -machine (QEMU >= 5.0) needs no NUMA node; size must equal -m.
    -object "memory-backend-memfd,id=mem,size=${memory}M,share=on"
    -machine "q35,memory-backend=mem"
    # No default devices (VGA, NIC and their option ROMs, monitor): only what is listed here.
    -nodefaults
    -display none
    # The serial console on stdout; nothing is read from stdin.
    -chardev "stdio,id=console"
    -serial chardev:console
    # The guest's poweroff ends QEMU; a reboot (panic=-1 after a kernel panic) ends it too.
    -no-reboot
    -kernel "$kernel"
    -initrd "$initrd"
    -append "console=ttyS0 panic=-1 loglevel=4 $append"
    # The LUKS2 volume: an ordinary virtio-blk disk, found in the guest by its serial.
    -drive "file=$volume,if=none,id=volume,format=raw,readonly=on"
    -device "virtio-blk-pci,drive=volume,serial=$volume_serial$virtio_opts"
)

# True when $1 ($2 names it in messages) can be attached; otherwise says why and leaves it out,
# or stops here under KEYSHARD_MISSING_FRAGMENT=fail.
attachable() {
    [[ "$1" != *,* ]] || die "QEMU options cannot take a path with a comma: $1"
    socket_accepts "$1" && return 0
    [ "${KEYSHARD_MISSING_FRAGMENT:-skip}" = fail ] && die "$2 socket $1 does not accept connections"
    echo "run-qemu: $2 socket $1 does not accept connections; booting without it" >&2
    return 1
}

index=0
for socket in "${sockets[@]}"; do
    attachable "$socket" fragment || continue
    args+=(
        # reconnect=1: if the device process restarts, QEMU connects again after 1 s.
        # (QEMU 9.2 added reconnect-ms= and deprecated reconnect=; 7.2 knows only reconnect=.)
        -chardev "socket,id=fragment$index,path=$socket,reconnect=1"
        # The serial the guest sees (ksf-<holder id>) comes from the device itself
        # (VIRTIO_BLK_T_GET_ID); vhost-user-blk-pci has no serial property. num-queues defaults
        # to the vCPU count, so it is pinned to what vhost-keyshard serves.
        -device "vhost-user-blk-pci,chardev=fragment$index,num-queues=1$virtio_opts"
    )
    index=$((index + 1))
done

broker_attached=no
if [ -n "$broker" ] && attachable "$broker" broker; then
    args+=(
        # The broker mailbox, attached like a fragment device. It is writable because the
        # coordinator does not offer VIRTIO_BLK_F_RO: vhost-user-blk-pci has no read-only
        # property, the device decides. Its serial (ksb-<vm id>) comes from the coordinator.
        -chardev "socket,id=broker,path=$broker,reconnect=1"
        -device "vhost-user-blk-pci,chardev=broker,num-queues=1$virtio_opts"
    )
    broker_attached=yes
fi

if [ -n "${KEYSHARD_QEMU_EXTRA_ARGS:-}" ]; then
    read -r -a extra <<< "$KEYSHARD_QEMU_EXTRA_ARGS"
    args+=("${extra[@]}")
fi

if [ "$dry_run" = 1 ]; then
    printf '%s\n' "$qemu" "${args[@]}"
    exit 0
fi
version=$("$qemu" --version) || die "cannot run $qemu (apt-get install qemu-system-x86)"
broker_note=
[ -n "$broker" ] && broker_note="; broker attached: $broker_attached"
echo "run-qemu: ${version%%$'\n'*}; accel $accel; iommu_platform ${KEYSHARD_IOMMU_PLATFORM:-off}; ${#sockets[@]} fragment socket(s) given, $index attached$broker_note" >&2
exec "$qemu" "${args[@]}" < /dev/null
