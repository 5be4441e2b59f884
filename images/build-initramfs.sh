#!/usr/bin/env bash
# Builds the keyshard guest initramfs (an uncompressed newc cpio, the fastest to unpack under TCG):
#   busybox (static) and its applets, the kernel modules virtio_pci, virtio_blk, dm_crypt, xts,
#   ecb, ext4 and crc32c_generic (those not built in) with their dependencies (resolved from
#   modules.dep, loaded in that order), a statically
#   linked keyshard-guest, cryptsetup with its libraries, the guest manifest at
#   /etc/keyshard/manifest.toml, images/init.sh as /init, and images/virtio-report.sh as
#   /bin/virtio-report (used only when the kernel command line says rdinit=/bin/virtio-report).
#
# The sev-guest driver (/dev/sev-guest, through which an SEV-SNP guest asks for its attestation
# report) is looked up in the kernel's modules.dep and modules.builtin, and the output says what
# was found. When the manifest has sev holders: a sev-guest module is packed and loaded with the
# others; a kernel without the driver is refused (the guest could never ask for those shares),
# unless --allow-no-sev-guest, which builds it anyway with a warning. The Debian cloud kernel
# (linux-image-cloud-amd64) has no sev-guest (CONFIG_VIRT_DRIVERS unset); Debian's generic
# kernel (linux-image-amd64) has it as a module (CONFIG_SEV_GUEST=m).
#
# Usage:
#   images/build-initramfs.sh --guest-bin FILE --manifest FILE --out FILE
#                             [--kernel FILE | --kernel-version VER] [--modules-dir DIR]
#                             [--allow-no-sev-guest]
#
#   --guest-bin FILE   keyshard-guest, statically linked (see the Makefile's guest-static target:
#                      RUSTFLAGS='-C target-feature=+crt-static' cargo build --release
#                      -p guest-driver --bin keyshard-guest --target x86_64-unknown-linux-gnu)
#   --manifest FILE    the guest manifest (`keyshard split ... --manifest-out FILE`)
#   --out FILE         the initramfs to write
#   --kernel FILE      the kernel the initramfs is for (/boot/vmlinuz-VER); its modules are taken
#                      from /lib/modules/VER. Default: the newest /boot/vmlinuz-*-cloud-amd64.
#   --kernel-version   VER instead of --kernel
#   --modules-dir DIR  module tree (default /lib/modules/VER); needs modules.dep
#   --allow-no-sev-guest  build even when the manifest has sev holders and the kernel has no
#                      sev-guest driver (those holders will be reported missing in the guest)
#
# Needs: busybox-static, cryptsetup-bin, cpio, and the kernel package (linux-image-cloud-amd64).
set -euo pipefail
# No `cmd | grep -q` or `| head -1` below: with pipefail an early-closing reader can fail the
# pipeline with SIGPIPE at random.
trap 'echo "build-initramfs: failed (exit $?) at line $LINENO" >&2' ERR

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# dm_crypt asks for xts/ecb through request_module, which busybox modprobe cannot resolve from
# aliases, so they are loaded explicitly (LUKS2 default cipher: aes-xts-plain64); so is ext4's
# crc32c. AES is built into both Debian kernels; ext4 and crc32c_generic are built into the cloud
# kernel (skipped here) and modules in the generic one (linux-image-amd64, the one with sev-guest).
WANT_MODULES=(virtio_pci virtio_blk dm_crypt xts ecb ext4 crc32c_generic)

die() { echo "build-initramfs: $*" >&2; exit 1; }
usage() { sed -n '/^# Usage:/,/^# Needs:/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

guest_bin='' manifest='' out='' kernel='' kver='' moddir='' allow_no_sev_guest=0
while [ $# -gt 0 ]; do
    case "$1" in
        --guest-bin) guest_bin=${2:?}; shift 2 ;;
        --manifest) manifest=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --kernel) kernel=${2:?}; shift 2 ;;
        --kernel-version) kver=${2:?}; shift 2 ;;
        --modules-dir) moddir=${2:?}; shift 2 ;;
        --allow-no-sev-guest) allow_no_sev_guest=1; shift ;;
        -h|--help) usage ;;
        *) echo "build-initramfs: unknown argument $1" >&2; usage ;;
    esac
done
if [ -z "$guest_bin" ] || [ -z "$manifest" ] || [ -z "$out" ]; then usage; fi
guest_bin=$(realpath -m "$guest_bin")
manifest=$(realpath -m "$manifest")
out=$(realpath -m "$out")

if [ -z "$kver" ]; then
    if [ -z "$kernel" ]; then
        kernels=(/boot/vmlinuz-*-cloud-amd64)
        [ -e "${kernels[0]}" ] || die "no /boot/vmlinuz-*-cloud-amd64: apt-get install linux-image-cloud-amd64"
        kernel=$(printf '%s\n' "${kernels[@]}" | sort -V | tail -n 1)
    fi
    base=$(basename "$kernel")
    [[ "$base" == vmlinuz-* ]] || die "cannot tell the kernel version from $kernel: pass --kernel-version"
    kver=${base#vmlinuz-}
fi
moddir=${moddir:-/lib/modules/$kver}
[ -f "$moddir/modules.dep" ] || die "no $moddir/modules.dep (kernel $kver not installed? depmod not run?)"
[ -f "$manifest" ] || die "no manifest $manifest"

# The sev-guest driver: a module (packed when the manifest has sev holders), built in, or absent.
sev_holders=0
# Any TOML spelling of a sev holder: [[holders]] tables or inline ones, either quote, a quoted
# key; outside comments. A false match only packs the driver (or asks for it).
grep -Eq "^[^#]*[\"']?class[\"']?[[:space:]]*=[[:space:]]*[\"']sev[\"']" "$manifest" && sev_holders=1
sev_guest_module=$(awk -F: '$1 ~ /(^|\/)sev-guest\.ko(\.(xz|zst|gz))?$/ {print $1; exit}' "$moddir/modules.dep")
if [ -n "$sev_guest_module" ]; then
    sev_guest="module $sev_guest_module"
    [ "$sev_holders" = 1 ] && WANT_MODULES+=(sev-guest)
elif [ -f "$moddir/modules.builtin" ] \
    && awk '/(^|\/)sev-guest\.ko$/ {found=1} END {exit !found}' "$moddir/modules.builtin"; then
    sev_guest="built in"
else
    sev_guest="absent"
    if [ "$sev_holders" = 1 ]; then
        msg="kernel $kver has no sev-guest driver (CONFIG_SEV_GUEST), so the guest has no /dev/sev-guest and can never ask for the manifest's sev holders; use a kernel that has it (Debian: linux-image-amd64, not linux-image-cloud-amd64)"
        [ "$allow_no_sev_guest" = 1 ] || die "$msg, or pass --allow-no-sev-guest"
        echo "build-initramfs: WARNING: $msg" >&2
    fi
fi

[ -f "$guest_bin" ] || die "no guest binary $guest_bin"
command -v cpio >/dev/null || die "cpio is missing: apt-get install cpio"
cryptsetup_bin=$(command -v cryptsetup) || die "cryptsetup is missing: apt-get install cryptsetup-bin"

is_static() {  # ldd says so for static and static-pie executables (and for scripts)
    local out
    out=$(ldd "$1" 2>&1 || true)
    [[ "$out" == *"not a dynamic executable"* || "$out" == *"statically linked"* ]]
}
if ! [ -x /bin/busybox ] || ! is_static /bin/busybox; then
    die "/bin/busybox is missing or not static: apt-get install busybox-static"
fi
is_static "$guest_bin" || die "$guest_bin is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static' and --target x86_64-unknown-linux-gnu"

stage=$(mktemp -d "${TMPDIR:-/tmp}/keyshard-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cd "$stage"
mkdir -p bin lib lib64 etc/keyshard proc sys dev run tmp mnt "lib/modules/$kver"
ln -s bin sbin
mkdir usr
ln -s ../bin usr/bin
ln -s ../bin usr/sbin
ln -s ../lib usr/lib

# busybox and a link per applet
cp /bin/busybox bin/busybox
for applet in $(/bin/busybox --list); do
    [ -e "bin/$applet" ] || ln -s busybox "bin/$applet"
done

# cryptsetup and its libraries, each at the path the loader looks for
copy_libs_of() {
    local lib
    # ldd lines: "libx.so.1 => /path/libx.so.1 (0x...)" or "\t/lib64/ld-linux-x86-64.so.2 (0x...)"
    for lib in $(ldd "$1" | awk '/=> \//{print $3} /^\t\//{print $1}'); do
        mkdir -p ".$(dirname "$lib")"
        [ -e ".$lib" ] || cp -L "$lib" ".$lib"
    done
}
cp -L "$cryptsetup_bin" bin/cryptsetup
copy_libs_of "$cryptsetup_bin"
# glibc dlopen()s libgcc_s.so.1 (pthread_exit); ldd does not list it, and argon2 keyslots with
# more than one thread abort without it.
gcc_s=$(ldconfig -p | awk '/libgcc_s\.so\.1 .*x86-64/ && !found {print $NF; found=1}')
[ -n "$gcc_s" ] || die "libgcc_s.so.1 not found"
mkdir -p ".$(dirname "$gcc_s")"
cp -L "$gcc_s" ".$gcc_s"

# Stripped when possible: every megabyte costs boot time under TCG.
strip -o bin/keyshard-guest "$guest_bin" 2>/dev/null || cp -L "$guest_bin" bin/keyshard-guest
chmod 755 bin/keyshard-guest

# kernel modules: each wanted module after its dependencies (post-order over modules.dep)
declare -A seen=()
order=()
dep_line() {  # the modules.dep line of a module path, or nothing
    awk -v m="$1:" 'index($0, m) == 1 {print; exit}' "$moddir/modules.dep"
}
add_module() {
    local rel=$1 dep
    [ -n "${seen[$rel]:-}" ] && return 0
    seen[$rel]=1
    for dep in $(dep_line "$rel" | cut -d: -f2-); do add_module "$dep"; done
    order+=("$rel")
}
for name in "${WANT_MODULES[@]}"; do
    pattern=${name//[-_]/[-_]}
    rel=$(awk -F: -v re="(^|/)${pattern}\\.ko(\\.(xz|zst|gz))?\$" '$1 ~ re {print $1; exit}' "$moddir/modules.dep")
    if [ -z "$rel" ]; then
        if awk -v re="/${pattern}\\.ko" '$0 ~ re {found=1} END {exit !found}' "$moddir/modules.builtin"; then
            continue   # built into this kernel
        fi
        die "module $name not found in $moddir"
    fi
    add_module "$rel"
done
: > etc/keyshard/modules.order
for rel in "${order[@]}"; do
    dst="lib/modules/$kver/${rel%.*}"
    case "$rel" in
        *.ko) dst="lib/modules/$kver/$rel"; mkdir -p "$(dirname "$dst")"; cp "$moddir/$rel" "$dst" ;;
        # busybox insmod cannot read every compressed format (.zst fails): unpack here.
        *.ko.xz) mkdir -p "$(dirname "$dst")"; xz -dc "$moddir/$rel" > "$dst" ;;
        *.ko.zst) mkdir -p "$(dirname "$dst")"; zstd -qdc "$moddir/$rel" > "$dst" ;;
        *.ko.gz) mkdir -p "$(dirname "$dst")"; gzip -dc "$moddir/$rel" > "$dst" ;;
        *) die "unexpected module file $rel" ;;
    esac
    echo "/$dst" >> etc/keyshard/modules.order
done

cp "$manifest" etc/keyshard/manifest.toml
chmod 644 etc/keyshard/manifest.toml
cp "$HERE/init.sh" init
chmod 755 init
cp "$HERE/virtio-report.sh" bin/virtio-report
chmod 755 bin/virtio-report
echo "$kver" > etc/keyshard/kernel-version

mkdir -p "$(dirname "$out")"
find . -mindepth 1 -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --quiet --owner=0:0 --reproducible > "$out.tmp"
mv "$out.tmp" "$out"
echo "build-initramfs: $out ($(du -h "$out" | cut -f1)) for kernel $kver;" \
    "modules: $(for rel in "${order[@]}"; do basename "${rel%%.ko*}"; done | paste -sd' ')"
case "$sev_guest" in
    module*) [ "$sev_holders" = 1 ] && sev_note="packed and loaded: the manifest has sev holders" \
        || sev_note="not packed: the manifest has no sev holders" ;;
    "built in") sev_note="/dev/sev-guest on SEV-SNP guests" ;;
    *) sev_note="no /dev/sev-guest: sev holders cannot be asked" ;;
esac
echo "build-initramfs: sev-guest driver: $sev_guest ($sev_note)"
