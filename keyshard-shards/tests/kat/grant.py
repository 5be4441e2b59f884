#!/usr/bin/env python3
"""Known-answer vector for keyshard-shards' grants (src/grant), made independently of them.

Only Python's standard library and `cryptography` (Ed25519; 48.0.0 made the committed file) are
used; the layout is rebuilt here from the module documentation (src/grant/wire.rs), not from
the Rust code:

    statement = "KSGR" || 0x01 || lp(credential) || epoch (u64 LE) || index (u8)
                || lp(host id) || lp(instance id) || policy length (u16 LE) || policy
                || SHA-256(sealed shard) || not_after_ms (u64 LE)
    grant     = statement || Ed25519(cms key, "keyshard/grant/v1/signature" || statement)

(lp: one length byte, then the bytes.) The instance policy (`KSIP`) and the sealed shard
(`KSSE`) are inputs: their own formats have their own tests and vectors. Run
`python3 grant.py > grant.json` in this directory to regenerate; the output is deterministic.
"""

import hashlib
import json
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CMS_SEED = bytes([0x42] * 32)
CREDENTIAL = b"db-password"
EPOCH = 1
INDEX = 2
HOST = b"host-2"
INSTANCE = b"vm-web-1"
NOT_AFTER_MS = 1_795_953_600_000
# The AK of scalar 0x0a..0a and golden PCRs sha256:0 = 00.., 7 = 07.. as a KSIP record.
POLICY = bytes.fromhex(
    "4b53495001049d346aabe1466db5006749ae5251f75912a2336b5022540f29f1dbdc98ea32362c1296b7027bb59214d597177b7cc90ecc72aebea2729b16180bba"
    "89c87c87574a004b53505601000b02000000000000000000000000000000000000000000000000000000000000000000070707070707070707070707070707070707070707070707070707070707070707"
)
# "a shard" sealed for (db-password, 1, 2, host-2) to the key of scalar 0x07..07 with the
# ephemeral scalar 0x0e..0e.
SEALED = bytes.fromhex(
    "4b53534501046d1385ffacc9bd4850b750da17c063432bcdb523d90ec9cf9250ba5a1bd306639bc89cbeb62959b428c88a6e9f88a553d689a1a15b2a26a8ba5f66d97fcd87b4fcb264731a8a4deec0d1169f5a16d08a4e2cfc40a60ea0"
)


def lp(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def main() -> None:
    statement = (
        b"KSGR"
        + b"\x01"
        + lp(CREDENTIAL)
        + struct.pack("<Q", EPOCH)
        + bytes([INDEX])
        + lp(HOST)
        + lp(INSTANCE)
        + struct.pack("<H", len(POLICY))
        + POLICY
        + hashlib.sha256(SEALED).digest()
        + struct.pack("<Q", NOT_AFTER_MS)
    )
    key = Ed25519PrivateKey.from_private_bytes(CMS_SEED)
    signature = key.sign(b"keyshard/grant/v1/signature" + statement)
    print(
        json.dumps(
            {
                "cms_seed": CMS_SEED.hex(),
                "policy": POLICY.hex(),
                "sealed": SEALED.hex(),
                "grant": (statement + signature).hex(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
