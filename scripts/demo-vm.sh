#!/usr/bin/env bash
# The VM half of the keyshard demo: a volume key split 3 of 3 onto fragment devices, a VM whose
# initramfs rebuilds it and opens its LUKS2 disk; then the same VM with one device stopped, which
# stays locked, names the missing holder, and still powers off on its own.
#
# Usage: scripts/demo-vm.sh KEYSHARD VHOST_KEYSHARD KEYSHARD_GUEST_STATIC [KERNEL]
set -euo pipefail

keyshard=$(realpath "$1")
vhost_keyshard=$(realpath "$2")
guest_bin=$(realpath "$3")
kernel=${4:-$(printf "%s\n" /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -n 1)}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$repo/.demo/vm

step() { printf '\n== %s\n' "$*"; }

daemons=()
cleanup() {
    for pid in "${daemons[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Starts one fragment device and waits for its ready line.
serve() {
    local i=$1
    local out=$work/vhd-$i.out
    "$vhost_keyshard" --socket-path "$work/vhd-$i.sock" \
        --fragment "$work/fragments/fragment-$i.ksf" > "$out" 2>>"$work/daemons.log" &
    daemons[i]=$!
    for _ in $(seq 100); do
        grep -qs '^ready' "$out" && break
        sleep 0.1
    done
    grep '^ready' "$out" | sed 's/^/  /' || { echo "vhost-keyshard $i did not get ready" >&2; exit 1; }
}

# Boots the VM; shows the guest's KEYSHARD lines, keeps the whole console in $work/$1.log.
boot() {
    local log=$work/$1.log
    local started=$SECONDS
    "$repo/qemu-configs/run-qemu.sh" --kernel "$kernel" --initrd "$work/initramfs.cpio" \
        --volume "$work/volume.img" --fragment-socket "$work/vhd-1.sock" \
        --fragment-socket "$work/vhd-2.sock" --fragment-socket "$work/vhd-3.sock" \
        > "$log" 2> "$work/$1.qemu.log"
    sed -n 's/\r$//
        /KEYSHARD-E2E: keyshard-guest stderr begin/,/KEYSHARD-E2E: keyshard-guest stderr end/{/KEYSHARD-E2E/!s/^/    guest: /p}
        /KEYSHARD-E2E: file .* begin/,/KEYSHARD-E2E: file end/{/KEYSHARD-E2E/!s/^/    file: /p}
        /KEYSHARD-E2E/p' "$log" | sed 's/^KEYSHARD-E2E: /  console: /'
    echo "  (the VM ran $((SECONDS - started)) s under ${KEYSHARD_ACCEL:-tcg}; full console in $log)"
}

step "8. A VM image: a new volume key split 3 of 3, its LUKS2 volume, an initramfs with the manifest"
"$repo/images/build-example.sh" --keyshard "$keyshard" --guest-bin "$guest_bin" \
    --kernel "$kernel" --out-dir "$work" > /dev/null
echo "  $(ls "$work/fragments" | tr '\n' ' ')+ manifest.toml, volume.img, initramfs.cpio in $work"

step "9. Three fragment devices (vhost-keyshard), each ready only once its socket listens"
for i in 1 2 3; do serve "$i"; done

step "10. Boot: the guest reads the fragments over virtio at boot and unlocks its disk"
boot unlock
grep -q 'KEYSHARD-E2E: unlocked' "$work/unlock.log"

step "11. Stop the device of holder vhd-2 and boot again: quorum not met, the disk stays locked"
kill "${daemons[2]}"
wait "${daemons[2]}" 2>/dev/null || true
boot locked
grep -q 'KEYSHARD-E2E: locked' "$work/locked.log"
! grep -q 'KEYSHARD-E2E: unlocked' "$work/locked.log"
