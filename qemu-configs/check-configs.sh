#!/usr/bin/env bash
# Checks the VMM configurations that the tests do not boot (`make check-configs`, part of
# `make test`; about a second):
#   libvirt-domain.xml   validated against libvirt's schema (virt-xml-validate) and defined on
#                        libvirt's test driver (virsh -c test:///default define: libvirt's own
#                        checks of vhostuser disks, in memory; nothing is started or kept),
#                        as shipped and with <driver iommu='on'/> on every disk (the SEV setting
#                        the README documents).
#   cloud-hypervisor.sh  bash -n, then --dry-run with real files and sockets: every option and
#                        every key=value it passes must be one cloud-hypervisor documents, and
#                        each socket must appear as one vhost-user disk. cloud-hypervisor itself
#                        is not packaged in bookworm (and needs KVM), so it never runs here.
# Needs: libvirt-clients (virt-xml-validate, virsh) and libxml2-utils (xmllint, which
# virt-xml-validate runs).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fail() { echo "check-configs: $*" >&2; exit 1; }
for tool in virt-xml-validate virsh; do
    command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install libvirt-clients"
done
command -v xmllint >/dev/null || fail "xmllint is missing: apt-get install libxml2-utils"

work=$(mktemp -d "${TMPDIR:-/tmp}/keyshard-configs.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- libvirt ---------------------------------------------------------------------------------
domain=$HERE/libvirt-domain.xml
with_iommu=$work/libvirt-domain-iommu.xml
# Every disk's <driver name='qemu' ...> line gains iommu='on' (comments are left alone).
sed "s|^\([[:space:]]*<driver name='qemu' type='raw'\)|\1 iommu='on'|" "$domain" > "$with_iommu"
[ "$(grep -c "^[[:space:]]*<driver name='qemu' type='raw' iommu='on'" "$with_iommu")" \
    -eq "$(grep -c '^[[:space:]]*<disk ' "$domain")" ] \
    || fail "not every disk of $domain got iommu='on': its <driver> lines changed shape"
for xml in "$domain" "$with_iommu"; do
    # The type argument: the leading comment hides the root element from its guess.
    out=$(virt-xml-validate "$xml" domain 2>&1) || fail "$xml does not validate: $out"
    out=$(virsh -q -c test:///default define "$xml" 2>&1) || fail "virsh define $xml: $out"
done
echo "check-configs: libvirt-domain.xml validates and defines (as shipped and with iommu='on')"

# --- cloud-hypervisor ------------------------------------------------------------------------
ch=$HERE/cloud-hypervisor.sh
bash -n "$ch" || fail "$ch does not parse"
touch "$work/vmlinux" "$work/initramfs.cpio" "$work/volume.img"
sockets=("$work/vhd-1.sock" "$work/vhd-2.sock")
broker=$work/broker.sock
args=(--kernel "$work/vmlinux" --initrd "$work/initramfs.cpio" --volume "$work/volume.img"
      --fragment-socket "${sockets[0]}" --fragment-socket "${sockets[1]}"
      --broker-socket "$broker" --dry-run)
mapfile -t line < <(KEYSHARD_CLOUD_HYPERVISOR=cloud-hypervisor "$ch" "${args[@]}")
[ "${line[0]:-}" = cloud-hypervisor ] || fail "dry run printed no command: ${line[*]}"

# Options and keys from cloud-hypervisor's documentation (docs/*.md, `cloud-hypervisor --help`).
declare -A keys=(
    [--cpus]="boot max topology kvm_hyperv max_phys_bits affinity features"
    [--memory]="size mergeable shared hugepages hugepage_size prefault thp hotplug_method hotplug_size hotplugged_size"
    [--disk]="path readonly direct iommu num_queues queue_size vhost_user socket bw_size bw_one_time_burst bw_refill_time ops_size ops_one_time_burst ops_refill_time id pci_segment rate_limit_group queue_affinity serial"
    [--kernel]="" [--initramfs]="" [--cmdline]="" [--serial]="" [--console]=""
)
vhost_user_disks=()
option=
for word in "${line[@]:1}"; do
    if [[ "$word" == --* ]]; then
        [ -n "${keys[$word]+set}" ] || fail "unknown cloud-hypervisor option $word"
        option=$word
        continue
    fi
    [ -n "$option" ] || fail "value $word before any option"
    case "$option" in
        --kernel|--initramfs) [ -f "$word" ] || fail "$option $word: no such file" ;;
        --cmdline) ;;
        --serial|--console)
            [[ "$word" =~ ^(off|null|pty|tty|file=.+|socket=.+)$ ]] || fail "$option $word" ;;
        *)
            IFS=, read -r -a pairs <<< "$word"
            for pair in "${pairs[@]}"; do
                key=${pair%%=*}
                [[ "$pair" == *=?* ]] || fail "$option $word: $pair is not key=value"
                [[ " ${keys[$option]} " == *" $key "* ]] || fail "$option: unknown key $key in $word"
            done
            [[ "$option,$word" == --disk,vhost_user=true,* ]] && vhost_user_disks+=("$word")
            ;;
    esac
done
[ "${#vhost_user_disks[@]}" -eq 3 ] || fail "expected 3 vhost-user disks, got: ${vhost_user_disks[*]}"
for socket in "${sockets[@]}" "$broker"; do
    printf '%s\n' "${vhost_user_disks[@]}" | grep -qF "socket=$socket," \
        || fail "no vhost-user disk for $socket"
done
printf '%s\n' "${line[@]}" | grep -qx 'size=512M,shared=on' \
    || fail "guest memory is not shared (vhost-user needs --memory shared=on)"
echo "check-configs: cloud-hypervisor.sh dry run: every option and key is cloud-hypervisor's, 3 vhost-user disks, shared memory"
