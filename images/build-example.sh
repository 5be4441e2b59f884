#!/usr/bin/env bash
# Builds a complete, bootable example in one directory: a dealer key, a random 32-byte volume key
# split 3-of-3 onto `vhd` fragments (keyshard split --manifest-out), the LUKS2 volume that key
# opens, and the initramfs carrying the manifest. Prints the commands that serve the fragments
# and boot the VM. `make images` runs it; the e2e tests build their own sets the same way.
#
# Usage:
#   images/build-example.sh --keyshard BIN --guest-bin BIN --out-dir DIR [--kernel FILE]
#
#   --keyshard BIN    the keyshard CLI
#   --guest-bin BIN   keyshard-guest, statically linked
#   --out-dir DIR     created fresh (an earlier example there is replaced; anything else refused)
#   --kernel FILE     guest kernel (default: the newest /boot/vmlinuz-*-cloud-amd64)
set -euo pipefail
trap 'echo "build-example: failed (exit $?) at line $LINENO" >&2' ERR

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
MARKER=.keyshard-example

die() { echo "build-example: $*" >&2; exit 1; }
usage() { sed -n '/^# Usage:/,/^set -e/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

keyshard='' guest_bin='' out_dir='' kernel=''
while [ $# -gt 0 ]; do
    case "$1" in
        --keyshard) keyshard=${2:?}; shift 2 ;;
        --guest-bin) guest_bin=${2:?}; shift 2 ;;
        --out-dir) out_dir=${2:?}; shift 2 ;;
        --kernel) kernel=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "build-example: unknown argument $1" >&2; usage ;;
    esac
done
if [ -z "$keyshard" ] || [ -z "$guest_bin" ] || [ -z "$out_dir" ]; then usage; fi
keyshard=$(realpath "$keyshard")
if [ -z "$kernel" ]; then
    kernels=(/boot/vmlinuz-*-cloud-amd64)
    [ -e "${kernels[0]}" ] || die "no /boot/vmlinuz-*-cloud-amd64: apt-get install linux-image-cloud-amd64"
    kernel=$(printf '%s\n' "${kernels[@]}" | sort -V | tail -n 1)
fi

if [ -e "$out_dir" ]; then
    [ -f "$out_dir/$MARKER" ] || [ -z "$(ls -A "$out_dir")" ] \
        || die "$out_dir exists and is not an earlier example: refusing to replace it"
    rm -rf "$out_dir"
fi
mkdir -p "$out_dir"
out_dir=$(realpath "$out_dir")
touch "$out_dir/$MARKER"
cd "$out_dir"

"$keyshard" keygen --out dealer.pem > /dev/null
head -c 32 /dev/urandom > volume.key
chmod 600 volume.key
"$keyshard" split --secret-file volume.key --threshold 3 --shares 3 --signing-key dealer.pem \
    --out-dir fragments --key-id example --manifest-out manifest.toml > /dev/null
"$HERE/make-volume.sh" --key volume.key --out volume.img \
    --content "keyshard example: the volume opened with the key rebuilt from 3 fragment devices"
"$HERE/build-initramfs.sh" --guest-bin "$guest_bin" --manifest manifest.toml \
    --kernel "$kernel" --out initramfs.cpio

cat <<EOF
build-example: $out_dir is ready. To boot it:
  for i in 1 2 3; do
    vhost-keyshard --socket-path $out_dir/vhd-\$i.sock --fragment $out_dir/fragments/fragment-\$i.ksf &
  done
  $REPO/qemu-configs/run-qemu.sh --kernel $kernel --initrd $out_dir/initramfs.cpio \\
    --volume $out_dir/volume.img --fragment-socket $out_dir/vhd-1.sock \\
    --fragment-socket $out_dir/vhd-2.sock --fragment-socket $out_dir/vhd-3.sock
EOF
