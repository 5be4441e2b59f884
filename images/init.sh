#!/bin/sh
# /init of the keyshard guest initramfs (busybox sh). It unlocks the LUKS2 volume with the key
# that `keyshard-guest unlock` rebuilds from the fragment devices (and, when the manifest has tpm
# or sev holders, the shares the coordinator releases over the broker mailbox), shows one known
# file, and powers the VM off in every case, so the VM always ends on its own.
#
# Console markers (the e2e tests match them; keep them stable):
#   KEYSHARD-E2E: init started
#   KEYSHARD-E2E: modules loaded                    the virtio devices are probed
#   KEYSHARD-E2E: device /dev/vdX serial=...        one line per disk with a serial ('?': no
#                                                   answer to GET_ID in time)
#   KEYSHARD-E2E: keyshard-guest stderr begin/end   what keyshard-guest said, between the two
#   KEYSHARD-E2E: unlocked                          then the file between 'file begin'/'file end'
#   KEYSHARD-E2E: locked (...)                      the volume was not opened, and why
#   KEYSHARD-E2E: error: ...                        something else went wrong
#   KEYSHARD-E2E: poweroff
#
# Kernel command line options (all optional):
#   keyshard.volume_serial=ks-volume   virtio-blk serial of the LUKS2 volume
#   keyshard.file=keyshard-volume.txt  file on the volume to print
#   keyshard.volume_wait=10            seconds to wait for the volume to appear
#   keyshard.device_wait=2             seconds to wait for the fragment devices the manifest lists
#                                      (and for the broker device, when it lists tpm/sev holders)
#   keyshard.timeout=10                seconds keyshard-guest waits for the holders to answer
#   keyshard.watchdog=120              seconds after which the VM powers off whatever happens

export PATH=/bin
MANIFEST=/etc/keyshard/manifest.toml
MAPPER_NAME=ks-volume

say() { echo "KEYSHARD-E2E: $*"; }

finish() {
    sync
    say "poweroff"
    poweroff -f
    # poweroff -f does not return; if it ever did, stay here rather than let init exit (panic).
    while :; do sleep 60; done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
# CONFIG_DEVTMPFS_MOUNT is off in the Debian cloud kernel: mount /dev ourselves.
mount -t devtmpfs devtmpfs /dev
mkdir -p /run/cryptsetup /tmp /mnt

volume_serial=ks-volume
known_file=keyshard-volume.txt
volume_wait=10
device_wait=2
timeout=10
watchdog=120
# shellcheck disable=SC2013 # the command line is split into words on purpose
for opt in $(cat /proc/cmdline); do
    case "$opt" in
        keyshard.volume_serial=*) volume_serial=${opt#*=} ;;
        keyshard.file=*) known_file=${opt#*=} ;;
        keyshard.volume_wait=*) volume_wait=${opt#*=} ;;
        keyshard.device_wait=*) device_wait=${opt#*=} ;;
        keyshard.timeout=*) timeout=${opt#*=} ;;
        keyshard.watchdog=*) watchdog=${opt#*=} ;;
    esac
done

# Whatever hangs (a device that never answers, a stuck tool), the VM still ends.
(sleep "$watchdog"; echo "KEYSHARD-E2E: error: watchdog fired after ${watchdog}s"; poweroff -f) &

say "init started, kernel $(uname -r)"

while read -r module; do
    insmod "$module" || say "error: insmod $module failed"
done < /etc/keyshard/modules.order

say "modules loaded"

# Which block device is which. Reading a virtio-blk serial is a request to the device (GET_ID),
# and a read from a device whose backend stopped answering never returns: this shell never
# reads a device itself. keyshard-guest reads each serial in a worker process it abandons at
# the deadline, and lists a device that did not answer as '?'.
listing=$(keyshard-guest devices --until-serial "$volume_serial" --timeout "$volume_wait")
volume=
expected=$(grep -c '^class *= *"vhd"' "$MANIFEST")
found=0
while read -r dev serial; do
    [ -n "$dev" ] || continue
    [ "$serial" = "-" ] && continue
    say "device $dev serial=$serial"
    case "$serial" in ksf-*) found=$((found + 1)) ;; esac
    [ "$serial" = "$volume_serial" ] && [ -b "$dev" ] && volume=$dev
done <<EOF_LISTING
$listing
EOF_LISTING
say "fragment devices: $found of $expected in the manifest"

if [ -z "$volume" ]; then
    say "error: no block device with serial $volume_serial"
    say "locked (no volume)"
    finish
fi

# The secret never touches a file: keyshard-guest's stdout is held hex-encoded in this shell and
# replayed into cryptsetup only when keyshard-guest succeeded and printed something.
# keyshard-guest's stderr goes straight to the console.
# busybox ash has pipefail: the pipeline fails when keyshard-guest does.
# shellcheck disable=SC3040
set -o pipefail
say "keyshard-guest stderr begin"
secret_hex=$(keyshard-guest unlock --manifest "$MANIFEST" --timeout "$timeout" \
    --device-wait "$device_wait" | od -An -v -tx1 | tr -d ' \n')
status=$?
say "keyshard-guest stderr end"
# shellcheck disable=SC3040
set +o pipefail

if [ "$status" -ne 0 ]; then
    case "$status" in
        2) reason="quorum not met" ;;
        *) reason="error" ;;
    esac
    secret_hex=
    say "locked (keyshard-guest exit $status: $reason)"
    finish
fi
if [ -z "$secret_hex" ]; then
    say "locked (keyshard-guest exit 0 but printed no secret)"
    finish
fi

# printf is a busybox ash builtin: the escaped secret is not put on any process's command line.
# The format string is the secret as \xHH escapes, on purpose.
# shellcheck disable=SC2059
if ! printf "$(echo "$secret_hex" | sed 's/../\\x&/g')" \
    | cryptsetup open --readonly --key-file=- "$volume" "$MAPPER_NAME"; then
    secret_hex=
    say "locked (cryptsetup open failed: the rebuilt key does not open $volume)"
    finish
fi
secret_hex=

if ! mount -t ext4 -o ro "/dev/mapper/$MAPPER_NAME" /mnt; then
    say "error: mounting /dev/mapper/$MAPPER_NAME failed"
    cryptsetup close "$MAPPER_NAME"
    finish
fi
say "unlocked"
say "file $known_file begin"
cat "/mnt/$known_file" || say "error: cannot read /mnt/$known_file"
say "file end"
umount /mnt
cryptsetup close "$MAPPER_NAME"
finish
