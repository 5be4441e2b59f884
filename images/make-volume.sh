#!/usr/bin/env bash
# Makes the test LUKS2 volume: an ext4 filesystem holding one known file, encrypted with LUKS2
# and unlocked by a key file (raw bytes, normally the 32-byte secret that `keyshard split` shares).
#
# It needs no device-mapper on the host: mkfs.ext4 -d writes the filesystem into the image file,
# then `cryptsetup reencrypt --encrypt` encrypts it in place, entirely in userspace.
#
# Usage:
#   images/make-volume.sh --key FILE --out IMG [--content TEXT] [--file-name NAME]
#
#   --key FILE        the key file that unlocks keyslot 0 (its whole content is the key)
#   --out IMG         the volume image to write (32 MiB, sparse)
#   --content TEXT    the known file's content (default: a fixed line); a newline is appended
#   --file-name NAME  the known file's name at the filesystem root (default keyshard-volume.txt,
#                     the name images/init.sh prints)
#
# The keyslot uses PBKDF2 with 1000 iterations (the minimum): under QEMU TCG a default argon2id
# keyslot takes about 16 s to open; this one takes about 0.5 s. It is a test volume, not a template
# for real disks.
#
# Needs: cryptsetup-bin, e2fsprogs.
set -euo pipefail
trap 'echo "make-volume: failed (exit $?) at line $LINENO" >&2' ERR

FS_MIB=16      # the ext4 filesystem
HEADER_MIB=16  # room given up to the LUKS2 header (--reduce-device-size)

die() { echo "make-volume: $*" >&2; exit 1; }
usage() { sed -n '/^# Usage:/,/^# The keyslot/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

key='' out='' content="keyshard test volume: unlocked by the rebuilt key" file_name=keyshard-volume.txt
while [ $# -gt 0 ]; do
    case "$1" in
        --key) key=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --content) content=${2?}; shift 2 ;;
        --file-name) file_name=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "make-volume: unknown argument $1" >&2; usage ;;
    esac
done
if [ -z "$key" ] || [ -z "$out" ]; then usage; fi
[ -s "$key" ] || die "key file $key is missing or empty"
[[ "$file_name" != */* ]] || die "--file-name must be a plain name"
command -v cryptsetup >/dev/null || die "cryptsetup is missing: apt-get install cryptsetup-bin"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 is missing: apt-get install e2fsprogs"

root=$(mktemp -d "${TMPDIR:-/tmp}/keyshard-volume.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir "$root/fs"
printf '%s\n' "$content" > "$root/fs/$file_name"

mkdir -p "$(dirname "$out")"
rm -f "$out" "$out.tmp"
truncate -s $((FS_MIB + HEADER_MIB))M "$out.tmp"
mkfs.ext4 -q -F -L ks-volume -d "$root/fs" "$out.tmp" ${FS_MIB}M
cryptsetup reencrypt --encrypt --type luks2 --reduce-device-size ${HEADER_MIB}M \
    --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file "$key" --batch-mode "$out.tmp"

# Checks that need no device-mapper: the key opens a keyslot, and no plaintext is left.
cryptsetup open --test-passphrase --key-file "$key" "$out.tmp" \
    || die "the key does not open the new volume"
if grep -qaF -- "$content" "$out.tmp"; then
    die "the known file's content is still readable in $out"
fi
mv "$out.tmp" "$out"
echo "make-volume: $out (LUKS2, ext4 with /$file_name)"
