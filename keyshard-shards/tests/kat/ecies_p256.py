#!/usr/bin/env python3
"""Known-answer vectors for keyshard-shards' shard ECIES (src/ecies), made independently of it.

Only Python's `cryptography` package (pip install cryptography; 48.0.0 made the committed file)
does the curve arithmetic, HKDF and AES-GCM; the construction is rebuilt here from the module
documentation, not from the Rust code:

    Z      = x-coordinate of e*H (32 bytes, big-endian)
    info   = binding = lp("keyshard/shard-ecies/v1") || lp(credential) || epoch (u64 LE)
             || index (u8) || lp(host id)          (lp: one length byte, then the bytes)
    okm    = HKDF-SHA256(ikm = Z, salt = E || H, info, L = 44); key = okm[:32], nonce = okm[32:]
    sealed = "KSSE" || 0x01 || E || AES-256-GCM(key, nonce, shard, aad = binding)

E and H are SEC1 uncompressed points. Run `python3 ecies_p256.py > ecies_p256.json` in this
directory to regenerate the vectors; the output is deterministic.
"""

import hashlib
import json
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABEL = b"keyshard/shard-ecies/v1"


def lp(b: bytes) -> bytes:
    assert len(b) < 256
    return bytes([len(b)]) + b


def scalar(seed: str) -> int:
    """A deterministic private scalar in 1..n-1 from a name."""
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    return int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big") % (n - 1) + 1


def point(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def vector(name, host_seed, eph, credential, epoch, index, host_id, shard):
    host = ec.derive_private_key(scalar(host_seed), ec.SECP256R1())
    ephemeral = ec.derive_private_key(eph, ec.SECP256R1())
    big_h, big_e = point(host), point(ephemeral)
    z = ephemeral.exchange(ec.ECDH(), host.public_key())
    assert z == host.exchange(ec.ECDH(), ephemeral.public_key())
    binding = (
        lp(LABEL)
        + lp(credential.encode())
        + epoch.to_bytes(8, "little")
        + bytes([index])
        + lp(host_id.encode())
    )
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=big_e + big_h, info=binding).derive(z)
    key, nonce = okm[:32], okm[32:]
    sealed = b"KSSE" + b"\x01" + big_e + AESGCM(key).encrypt(nonce, shard, binding)
    return {
        "name": name,
        "host_scalar": f"{scalar(host_seed):064x}",
        "host_public": big_h.hex(),
        "ephemeral_scalar": f"{eph:064x}",
        "ephemeral_public": big_e.hex(),
        "credential": credential,
        "epoch": epoch,
        "index": index,
        "host_id": host_id,
        "shard": shard.hex(),
        "z": z.hex(),
        "binding": binding.hex(),
        "key": key.hex(),
        "nonce": nonce.hex(),
        "sealed": sealed.hex(),
    }


def ephemeral_with_leading_zero_z(host_seed: str) -> int:
    """The first ephemeral scalar from a fixed sequence whose Z starts with a zero byte: shows
    that Z is the full 32-byte coordinate, zeros kept (a TPM may drop them; keyshard pads)."""
    host = ec.derive_private_key(scalar(host_seed), ec.SECP256R1())
    for i in range(1, 100000):
        eph = scalar(f"ephemeral-zero-{i}")
        z = ec.derive_private_key(eph, ec.SECP256R1()).exchange(ec.ECDH(), host.public_key())
        if z[0] == 0:
            return eph
    raise SystemExit("no scalar found")


def main():
    vectors = [
        vector("basic", "host-a", scalar("ephemeral-1"), "db-password", 1, 1, "host-a",
               bytes(range(32))),
        vector("one_byte_shard_max_epoch_index", "host-b", scalar("ephemeral-2"), "k", 2**64 - 1,
               255, "host-b.eu_2", b"\x00"),
        vector("long_names", "host-c", scalar("ephemeral-3"), "C" * 64, 7, 3, "h" * 64,
               b"a signed fragment would be here"),
        vector("z_with_leading_zero", "host-a", ephemeral_with_leading_zero_z("host-a"),
               "db-password", 2, 4, "host-a", b"zero-padded Z"),
    ]
    json.dump(
        {
            "about": "keyshard-shards ECIES P-256 known answers, made by ecies_p256.py with "
                     "Python's cryptography package; see that script for the construction",
            "vectors": vectors,
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
