#!/usr/bin/env bash
# The demo's multi-host part: `keyshard lab up` starts on loopback a credential service (CMS),
# six shard hosts in 3 regions x 2 operators and a compute instance's TPM, each its own swtpm
# and process. A credential is put 4 of 6 (the largest k that six hosts in two operators spread:
# each operator holds 3 shares, each region 2), fetched by the instance, fetched again with two
# hosts stopped (the four left are enough), refused with a third stopped (exit 2, the hosts
# named), and the lab is brought down.
# A development lab: everything runs on this machine, so it shows the mechanics, not protection.
set -euo pipefail

keyshard=$(realpath "${1:-target/release/keyshard}")
work=$(realpath -m .demo-hosts)

step() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

# A lab left by an interrupted run is stopped and removed first; this one is stopped on exit.
if [[ -e "$work/lab.json" ]]; then
    "$keyshard" lab down --dir "$work" --purge > /dev/null || true
fi
rm -rf "$work"
trap '"$keyshard" lab down --dir "$work" > /dev/null 2>&1 || true' EXIT

step "1. A lab: CMS, six shard hosts (eu/us/ap x acme/globex), an instance TPM; each its own swtpm and process"
run "$keyshard" lab up --dir "$work" --hosts 6 | grep -v '^  \|^try:\|^3 of 4'
lab=$work/lab.json
cms=$(jq -r .cms.url "$lab")
ca=$(jq -r .ca_certificate "$lab")
cms_key=$(jq -r .cms.signing_key_public "$lab")
client_key=$(jq -r .client.private_key "$lab")
client_pub=$(jq -r .client.public_key "$lab")
policy=$(jq -r .instance.policy "$lab")
instance=$(jq -r .instance.id "$lab")
tcti=$(jq -r .instance.tcti "$lab")
jq -r '.hosts[] | "  \(.id): \(.region)/\(.operator) at \(.endpoint), pid \(.process.pid)"' "$lab"

step "2. Put a credential 4 of 6: no region or operator holds 4 shares, so none can rebuild it alone"
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/db-password"
run "$keyshard" credential put --cms "$cms" --ca "$ca" --name db --file "$work/db-password" \
    --client-pub "$client_pub" --threshold 4 --shares 6 --instance-policy "$policy" | tee "$work/put.out"

fetch() {
    run "$keyshard" credential fetch --cms "$cms" --ca "$ca" --cms-key "$cms_key" --name db \
        --instance-id "$instance" --client-key "$client_key" --tcti "$tcti" --out "$1"
}

step "3. The instance fetches it: its TPM quote to the CMS, then to each host, which releases its shard"
fetch "$work/db.1"
cmp "$work/db-password" "$work/db.1" && echo "db.1 is identical to the credential put"

mapfile -t hosts < <(sed -n 's/^ *share [0-9]*: //p' "$work/put.out")
stop_host() {
    local pid
    pid=$(jq -r --arg id "$1" '.hosts[] | select(.id == $id) | .process.pid' "$lab")
    printf '$ kill %s   # %s\n' "$pid" "$1"
    kill "$pid"
    while kill -0 "$pid" 2> /dev/null; do sleep 0.1; done
}

step "4. Two of the six hosts down (${hosts[0]}, ${hosts[1]}): the four left release, the fetch succeeds"
stop_host "${hosts[0]}"
stop_host "${hosts[1]}"
fetch "$work/db.2"
cmp "$work/db-password" "$work/db.2" && echo "db.2 is identical to the credential put"

step "5. A third host down (${hosts[2]}): three shares are not enough (exit 2, hosts named, nothing written)"
stop_host "${hosts[2]}"
set +e
fetch "$work/db.3"
code=$?
set -e
echo "exit code $code"
[[ $code -eq 2 && ! -e "$work/db.3" ]]

step "6. lab down: every process stopped (SIGTERM, then SIGKILL after a grace period)"
trap - EXIT
run "$keyshard" lab down --dir "$work"

printf "\nmulti-host demo complete: the lab's data and logs are in %s/\n" "$work"
