#!/usr/bin/env bash
# Fails when a crate's dependency tree holds a crate it must not: tss-esapi (and so libtss2)
# anywhere in the trees of vhost-keyshard, guest-driver, keyshard-attest and keyshard-shards
# (pure software: the CMS and instances use it without a TPM) and keyshard-lab (it starts
# processes; the TPMs are theirs), dev-dependencies included; sev and aws-lc-rs in what vhost-keyshard ships (its normal and build dependencies:
# its frontend tests use guest-driver, which reads SNP reports through sev).
#
# Each tree is listed whole (`cargo tree -p CRATE`) and searched, rather than asking
# `cargo tree -i FORBIDDEN -p CRATE`, which fails with the same exit status whether the crate is
# absent from the tree or cargo could not build the graph at all. A tree that cannot be listed,
# or whose root is not the crate asked for, fails the check too: it never passes by default.
# On a hit, `cargo tree -i` shows the path that pulls the crate in.
#
# Usage: check-crate-deps.sh            the rules below
#        check-crate-deps.sh RULE...    other rules, each CRATE:EDGES:FORBIDDEN[,FORBIDDEN...]
set -euo pipefail

CARGO=${CARGO:-cargo}
rules=(
    "vhost-keyshard:normal,build,dev:tss-esapi"
    "vhost-keyshard:normal,build:sev,aws-lc-rs,aws-lc-sys"
    "guest-driver:normal,build,dev:tss-esapi"
    "keyshard-attest:normal,build,dev:tss-esapi"
    "keyshard-shards:normal,build,dev:tss-esapi"
    "keyshard-lab:normal,build,dev:tss-esapi"
)
[[ $# -gt 0 ]] && rules=("$@")

failed=0
for rule in "${rules[@]}"; do
    IFS=: read -r crate edges forbidden <<<"$rule"
    if [[ -z "$crate" || -z "$edges" || -z "$forbidden" ]]; then
        echo "check-crate-deps: malformed rule '$rule' (want CRATE:EDGES:FORBIDDEN,...)" >&2
        exit 2
    fi
    if ! tree=$("$CARGO" tree -p "$crate" -e "$edges" --prefix none --format '{p}'); then
        echo "check-crate-deps: cannot list the tree of $crate" >&2
        failed=1
        continue
    fi
    root=$(head -n 1 <<<"$tree")
    if [[ "$root" != "$crate v"* ]]; then
        echo "check-crate-deps: the tree listed for $crate starts with '$root', not $crate" >&2
        failed=1
        continue
    fi
    IFS=, read -r -a names <<<"$forbidden"
    for name in "${names[@]}"; do
        if grep -q "^$name v" <<<"$tree"; then
            echo "check-crate-deps: $name is in the tree of $crate ($edges dependencies):" >&2
            "$CARGO" tree -p "$crate" -e "$edges" -i "$name" >&2 || true
            failed=1
        else
            echo "check-crate-deps: no $name in $crate ($edges)"
        fi
    done
done
exit "$failed"
