#!/usr/bin/env bash
# The VM half of the keyshard demo.
#   8-11  a volume key split 3 of 3 onto fragment devices, a VM whose initramfs rebuilds it and
#         opens its LUKS2 disk; then the same VM with one device stopped, which stays locked,
#         names the missing holder, and still powers off on its own.
#   12-16 examples/vhd-tpm.toml: two fragment devices and a share sealed to the host TPM, which
#         the coordinator releases over the VM's broker mailbox only while the host's PCRs 0 and
#         7 hold their golden values. The VM unlocks; after a PCR 7 extend it is refused, and
#         the guest names the PCR. Without /dev/tpmrm0 the demo starts a software TPM (swtpm).
#
# Usage: scripts/demo-vm.sh KEYSHARD VHOST_KEYSHARD KEYSHARD_GUEST_STATIC [KERNEL]
#
# With a real TPM (/dev/tpmrm0) the demo seals to it but does not extend its PCR 7, which would
# stay changed until the host reboots (and break anything else sealed to it): step 16 then only
# says how, unless KEYSHARD_DEMO_EXTEND_HOST_PCR7=1.
set -euo pipefail

keyshard=$(realpath "$1")
vhost_keyshard=$(realpath "$2")
guest_bin=$(realpath "$3")
kernel=${4:-$(printf "%s\n" /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -n 1)}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$repo/.demo/vm
tpm_work=$repo/.demo/tpm

step() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

# Every process the demo starts, stopped on exit in reverse order (coordinator before swtpm).
daemons=()   # the vhd-only part's fragment devices, by number: step 11 stops one
pids=()      # everything else
cleanup() {
    local i
    for pid in "${daemons[@]}"; do kill "$pid" 2>/dev/null || true; done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# refute PATTERN FILE: fails the demo when FILE has a line matching PATTERN. (`! grep` would not:
# set -e ignores a negated command.)
refute() {
    if grep -q "$1" "$2"; then
        echo "unexpected in $2: $(grep -m 1 "$1" "$2")" >&2
        exit 1
    fi
}

# start_daemon NAME OUT LOG CMD...: starts CMD in the background, its stdout in OUT and its
# stderr appended to LOG, and waits for its `ready` line; its pid is left in $started.
started=
start_daemon() {
    local name=$1 out=$2 log=$3
    shift 3
    "$@" > "$out" 2>> "$log" &
    started=$!
    for _ in $(seq 100); do
        grep -qs '^ready' "$out" && break
        kill -0 "$started" 2>/dev/null || break
        sleep 0.1
    done
    grep '^ready' "$out" | sed 's/^/  /' || {
        echo "$name did not get ready; its stderr ($log):" >&2
        tail -n 5 "$log" >&2
        exit 1
    }
}

# Starts one fragment device of the vhd-only part.
serve() {
    local i=$1
    start_daemon "vhost-keyshard $i" "$work/vhd-$i.out" "$work/daemons.log" \
        "$vhost_keyshard" --socket-path "$work/vhd-$i.sock" \
        --fragment "$work/fragments/fragment-$i.ksf"
    daemons[i]=$started
}

# boot LOG_BASE RUN_QEMU_ARGS...: boots the VM; shows the guest's KEYSHARD lines, keeps the
# whole console in LOG_BASE.log.
boot() {
    local log=$1.log qemu_log=$1.qemu.log
    shift
    local started_at=$SECONDS
    "$repo/qemu-configs/run-qemu.sh" --kernel "$kernel" "$@" > "$log" 2> "$qemu_log"
    sed -n 's/\r$//
        /KEYSHARD-E2E: keyshard-guest stderr begin/,/KEYSHARD-E2E: keyshard-guest stderr end/{/KEYSHARD-E2E/!s/^/    guest: /p}
        /KEYSHARD-E2E: file .* begin/,/KEYSHARD-E2E: file end/{/KEYSHARD-E2E/!s/^/    file: /p}
        /KEYSHARD-E2E/p' "$log" | sed 's/^KEYSHARD-E2E: /  console: /'
    echo "  (the VM ran $((SECONDS - started_at)) s under ${KEYSHARD_ACCEL:-tcg}; full console in $log)"
}

# What keyshard-guest wrote on the console of boot log $1.
guest_stderr() {
    sed -n 's/\r$//
        /KEYSHARD-E2E: keyshard-guest stderr begin/,/KEYSHARD-E2E: keyshard-guest stderr end/p' "$1"
}

step "8. A VM image: a new volume key split 3 of 3, its LUKS2 volume, an initramfs with the manifest"
"$repo/images/build-example.sh" --keyshard "$keyshard" --guest-bin "$guest_bin" \
    --kernel "$kernel" --out-dir "$work" > /dev/null
echo "  $(ls "$work/fragments" | tr '\n' ' ')+ manifest.toml, volume.img, initramfs.cpio in $work"

step "9. Three fragment devices (vhost-keyshard), each ready only once its socket listens"
for i in 1 2 3; do serve "$i"; done

step "10. Boot: the guest reads the fragments over virtio at boot and unlocks its disk"
vhd_boot=(--initrd "$work/initramfs.cpio" --volume "$work/volume.img"
    --fragment-socket "$work/vhd-1.sock" --fragment-socket "$work/vhd-2.sock"
    --fragment-socket "$work/vhd-3.sock")
boot "$work/unlock" "${vhd_boot[@]}"
grep -q 'KEYSHARD-E2E: unlocked' "$work/unlock.log"

step "11. Stop the device of holder vhd-2 and boot again: quorum not met, the disk stays locked"
kill "${daemons[2]}"
wait "${daemons[2]}" 2>/dev/null || true
boot "$work/locked" "${vhd_boot[@]}"
grep -q 'KEYSHARD-E2E: locked' "$work/locked.log"
refute 'KEYSHARD-E2E: unlocked' "$work/locked.log"

# ---- 12-16: a share sealed to the host TPM, released by the coordinator ----------------------

# Starts swtpm on state directory $1 on a free port pair below the ephemeral range, retrying when
# another process takes the ports first; sets $tcti.
start_swtpm() {
    local state=$1 port pid
    mkdir -p "$state"
    for _ in 1 2 3 4 5 6 7 8; do
        port=$((20000 + 2 * (RANDOM % 6000)))
        # Someone already listening on either port: try another pair.
        if (: < "/dev/tcp/127.0.0.1/$port") 2>/dev/null \
            || (: < "/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null; then
            continue
        fi
        swtpm socket --tpm2 --tpmstate dir="$state" \
            --server type=tcp,port=$port,bindaddr=127.0.0.1 \
            --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
            --flags not-need-init,startup-clear > /dev/null 2> "$state/swtpm.log" &
        pid=$!
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            # The control port is bound after the server port: when it answers, both do.
            if (: < "/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null; then
                pids+=("$pid")
                tcti="swtpm:host=127.0.0.1,port=$port"
                return 0
            fi
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        grep -q 'Address already in use' "$state/swtpm.log" && continue
        echo "swtpm did not start; its log ($state/swtpm.log):" >&2
        cat "$state/swtpm.log" >&2
        exit 1
    done
    echo "swtpm: no free port pair after 8 tries" >&2
    exit 1
}

step "12. The host's TPM: the coordinator seals a share to it and attests the host with it"
rm -rf "$tpm_work"
mkdir -p "$tpm_work"
real_tpm=0
if [ -e /dev/tpmrm0 ]; then
    real_tpm=1
    tcti=device:/dev/tpmrm0
    echo "  using this host's TPM, /dev/tpmrm0"
else
    command -v swtpm > /dev/null || { echo "swtpm is missing: make deps (apt-get install swtpm)" >&2; exit 1; }
    start_swtpm "$tpm_work/swtpm"
    echo "  this host has no /dev/tpmrm0: the demo starts a software TPM (swtpm) and uses it as"
    echo "  the host's TPM, at $tcti (pid ${pids[-1]})"
fi

step "13. keyshard init by examples/vhd-tpm.toml: 2 vhd fragments + 1 share sealed under PCRs 0 and 7 + 1 recovery share (printed once), k = 3"
head -c 32 /dev/urandom > "$tpm_work/volume.key"
chmod 600 "$tpm_work/volume.key"
run "$keyshard" init --policy "$repo/examples/vhd-tpm.toml" --state-dir "$tpm_work/state" \
    --secret-file "$tpm_work/volume.key" --tcti "$tcti" --vm-id vm1 2>&1 | sed 's/^/  /'
"$repo/images/make-volume.sh" --key "$tpm_work/volume.key" --out "$tpm_work/volume.img" \
    --content "keyshard demo: the volume opened with 2 fragments and the share the host TPM released" \
    > /dev/null
"$repo/images/build-initramfs.sh" --guest-bin "$guest_bin" --manifest "$tpm_work/state/manifest.toml" \
    --kernel "$kernel" --out "$tpm_work/initramfs.cpio" > /dev/null
echo "  the guest's manifest lists: $(sed -n 's/^id = "\(.*\)"/\1/p' "$tpm_work/state/manifest.toml" | paste -sd' ')"
echo "  volume.img and initramfs.cpio (with state/manifest.toml) in $tpm_work"

step "14. Two fragment devices and the coordinator, which serves the VM's broker mailbox (ksb-vm1)"
for i in 1 2; do
    start_daemon "vhost-keyshard vhd-$i" "$tpm_work/vhd-$i.out" "$tpm_work/daemons.log" \
        "$vhost_keyshard" --socket-path "$tpm_work/vhd-$i.sock" \
        --fragment "$tpm_work/state/fragments/vhd-$i.ksf"
    pids+=("$started")
done
start_daemon "keyshard coordinator" "$tpm_work/coordinator.out" "$tpm_work/coordinator.log" \
    "$keyshard" coordinator --state-dir "$tpm_work/state" \
    --broker "vm1=$tpm_work/broker-vm1.sock" --tcti "$tcti"
pids+=("$started")
tpm_boot=(--initrd "$tpm_work/initramfs.cpio" --volume "$tpm_work/volume.img"
    --fragment-socket "$tpm_work/vhd-1.sock" --fragment-socket "$tpm_work/vhd-2.sock"
    --broker-socket "$tpm_work/broker-vm1.sock")

step "15. Boot: two fragments over virtio, tpm-1 from the coordinator once the host's quote matches"
boot "$tpm_work/unlock" "${tpm_boot[@]}"
grep -q 'KEYSHARD-E2E: unlocked' "$tpm_work/unlock.log"
sed 's/^/  audit: /' "$tpm_work/state/audit.log"

step "16. PCR 7 changes (as with another Secure Boot state): the next boot is refused"
if [ "$real_tpm" = 1 ] && [ "${KEYSHARD_DEMO_EXTEND_HOST_PCR7:-0}" != 1 ]; then
    echo "  skipped: extending PCR 7 of this host's real TPM would stay until the host reboots."
    echo "  KEYSHARD_DEMO_EXTEND_HOST_PCR7=1 make demo does it anyway."
    printf "\nVM demo complete: files are in %s and %s\n" "$work" "$tpm_work"
    exit 0
fi
run env TPM2TOOLS_TCTI="$tcti" tpm2_pcrextend \
    "7:sha256=$(printf 'keyshard demo: an unexpected boot component' | sha256sum | cut -c1-64)"
boot "$tpm_work/refused" "${tpm_boot[@]}"
grep -q 'KEYSHARD-E2E: locked' "$tpm_work/refused.log"
refute 'KEYSHARD-E2E: unlocked' "$tpm_work/refused.log"
refusal=$(guest_stderr "$tpm_work/refused.log")
grep -q 'tpm-1.*PCR 7' <<< "$refusal" || { echo "the guest did not name tpm-1 and PCR 7" >&2; exit 1; }
tail -n 1 "$tpm_work/state/audit.log" | sed 's/^/  audit: /'
grep -q '"verdict":"refused".*PCR 7' "$tpm_work/state/audit.log"

printf "\nVM demo complete: files are in %s and %s\n" "$work" "$tpm_work"
