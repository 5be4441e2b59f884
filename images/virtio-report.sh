#!/bin/sh
# An optional first init for the keyshard guest (kernel command line `rdinit=/bin/virtio-report`):
# it starts a reporter in the background, then execs the real /init (images/init.sh), which
# keeps PID 1. The reporter prints one console line per virtio device once a driver has bound
# it, with the feature bits the guest negotiated:
#   KEYSHARD-E2E: virtio virtio2 device=0x0002 features=0100...   (bit 0 first, 64 bits)
# The e2e test tests/tests/access_platform.rs reads bit 33 (VIRTIO_F_ACCESS_PLATFORM) from it.
# It reads sysfs attributes only (no request to any device, so a device that does not answer
# cannot block it), and gives up after 60 s; /init mounts sysfs, the reporter waits for it.
export PATH=/bin
# ash gives a background job /dev/null as stdin, and /dev holds only the console until /init
# mounts devtmpfs over it: make the node in the initramfs's own /dev.
[ -e /dev/null ] || mknod /dev/null c 1 3
(
    seen=' '
    ticks=0
    while [ "$ticks" -lt 600 ]; do
        for dev in /sys/bus/virtio/devices/virtio*; do
            [ -e "$dev/driver" ] && [ -r "$dev/features" ] || continue
            name=${dev##*/}
            case "$seen" in *" $name "*) continue ;; esac
            seen="$seen$name "
            echo "KEYSHARD-E2E: virtio $name device=$(cat "$dev/device") features=$(cat "$dev/features")"
        done
        usleep 100000
        ticks=$((ticks + 1))
    done
) &
exec /init "$@"
