#!/usr/bin/env bash
# The keyshard demo: split a random key 3 of 5, rebuild it from any three fragments, and show
# that two are not enough and that a tampered fragment is named and skipped.
set -euo pipefail

keyshard=$(realpath "${1:-target/release/keyshard}")
work=.demo
rm -rf "$work"
mkdir -p "$work"
cd "$work"

step() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "1. A dealer key pair (Ed25519): the guest will trust only fragments it signed"
run "$keyshard" keygen --out dealer.pem

step "2. A random 32-byte volume key"
head -c 32 /dev/urandom > volume.key
echo "volume.key: $(wc -c < volume.key) bytes, sha256 $(sha256sum volume.key | cut -c1-16)..."

step "3. Split it 3 of 5 into signed fragments"
run "$keyshard" split --secret-file volume.key --threshold 3 --shares 5 \
    --signing-key dealer.pem --out-dir fragments --key-id demo-volume
run "$keyshard" inspect fragments/fragment-1.ksf

step "4. Any three fragments rebuild it"
mapfile -t three < <(ls fragments/*.ksf | shuf -n 3)
run "$keyshard" combine --verify-key dealer.pem.pub "${three[@]}" --out rebuilt.key
cmp volume.key rebuilt.key && echo "rebuilt.key is identical to volume.key"

step "5. Two fragments are refused (exit code 2, nothing on stdout)"
set +e
printf '$ %s > two.out\n' "$keyshard combine --verify-key dealer.pem.pub ${three[*]:0:2}"
"$keyshard" combine --verify-key dealer.pem.pub "${three[@]:0:2}" > two.out
code=$?
set -e
echo "exit code $code, $(wc -c < two.out) bytes on stdout"
[[ $code -eq 2 && ! -s two.out ]]

step "6. A tampered fragment is named and skipped; the other three still rebuild the key"
cp fragments/fragment-2.ksf tampered.ksf
printf '\xff' | dd of=tampered.ksf bs=1 seek=60 conv=notrunc status=none
echo "flipped byte 60 of a copy of fragment-2: tampered.ksf"
run "$keyshard" combine --verify-key dealer.pem.pub tampered.ksf \
    fragments/fragment-1.ksf fragments/fragment-3.ksf fragments/fragment-5.ksf --out again.key
cmp volume.key again.key && echo "again.key is identical to volume.key"

step "7. Policies: which adversaries each resists; shares root on the host can reach must not make k without an override"
run "$keyshard" policy check ../examples/vhd-tpm.toml
printf 'threshold = 3\n[holders]\nvhd = 3\n' > vhd-only-no-override.toml
set +e
run "$keyshard" policy check vhd-only-no-override.toml
code=$?
set -e
echo "exit code $code"
[[ $code -eq 1 ]]

printf "\ncommand-line demo complete: files are in %s/\n" "$work"
