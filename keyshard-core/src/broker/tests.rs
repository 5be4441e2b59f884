//! Broker message tests: every kind round-trips, and every malformation is its own error.

use super::*;

fn holder(id: &str) -> HolderId {
    HolderId::new(id).unwrap()
}

fn samples() -> Vec<Message> {
    let bodies = vec![
        Body::NonceRequest,
        Body::Release {
            class: HolderClass::Tpm,
            holder_id: holder("tpm-1"),
            request_key: [7; 32],
            evidence: Evidence::None,
        },
        Body::Release {
            class: HolderClass::Sev,
            holder_id: holder("sev-1"),
            request_key: [8; 32],
            evidence: Evidence::Snp {
                nonce: [9; 32],
                report: vec![1; 1184],
                vcek: vec![2; 1360],
            },
        },
        Body::Nonce {
            nonce: [3; 32],
            valid_for_ms: 60_000,
        },
        Body::Pending,
        Body::Released {
            class: HolderClass::Tpm,
            holder_id: holder("tpm-1"),
            envelope: Envelope {
                encapped_key: [4; 32],
                ciphertext: vec![5; 181],
            },
            host_quote: None,
        },
        Body::Release {
            class: HolderClass::Tpm,
            holder_id: holder("tpm-1"),
            request_key: [7; 32],
            evidence: Evidence::TpmNonce { nonce: [6; 32] },
        },
        Body::Released {
            class: HolderClass::Tpm,
            holder_id: holder("tpm-1"),
            envelope: Envelope {
                encapped_key: [4; 32],
                ciphertext: vec![5; 181],
            },
            host_quote: Some(HostQuote {
                attest: vec![0xff; 145],
                signature: [0x11; QUOTE_SIGNATURE_LEN],
                path: vec![
                    merkle::PathStep {
                        sibling_on_left: true,
                        sibling: [0x22; 32],
                    },
                    merkle::PathStep {
                        sibling_on_left: false,
                        sibling: [0x33; 32],
                    },
                ],
            }),
        },
        Body::Release {
            class: HolderClass::Host,
            holder_id: holder("host-1"),
            request_key: [7; 32],
            evidence: Evidence::VmTpm,
        },
        host_released(),
        Body::Refused {
            code: RefusalCode::HostAttestation,
            reason: "PCR 7 differs from its golden value".into(),
        },
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Message {
            request_id: 0x1122_3344_5566_7700 + i as u64,
            body,
        })
        .collect()
}

#[test]
fn every_kind_round_trips_with_and_without_sector_padding() {
    for message in samples() {
        let mut bytes = message.encode().unwrap();
        assert_eq!(Message::parse(&bytes).unwrap(), message);
        bytes.resize(bytes.len().div_ceil(512) * 512, 0);
        assert_eq!(Message::parse(&bytes).unwrap(), message);
    }
}

#[test]
fn header_layout_is_as_documented() {
    let bytes = Message {
        request_id: 0x0102_0304_0506_0708,
        body: Body::Pending,
    }
    .encode()
    .unwrap();
    assert_eq!(
        bytes,
        [
            b'K', b'S', b'B', b'M', 1, 0x82, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0
        ]
    );
}

#[test]
fn every_truncation_is_reported() {
    for message in samples() {
        let bytes = message.encode().unwrap();
        for len in 0..bytes.len() {
            assert!(
                matches!(
                    Message::parse(&bytes[..len]),
                    Err(MessageError::Truncated { .. })
                ),
                "{:?} cut at {len}",
                message.body
            );
        }
    }
}

#[test]
fn header_malformations() {
    let good = samples()[0].encode().unwrap();
    let with = |pos: usize, byte: u8| {
        let mut bytes = good.clone();
        bytes[pos] = byte;
        Message::parse(&bytes).unwrap_err()
    };
    assert_eq!(with(0, b'X'), MessageError::BadMagic);
    assert_eq!(with(4, 2), MessageError::UnsupportedVersion(2));
    assert_eq!(with(5, 0x42), MessageError::UnknownKind(0x42));
    assert_eq!(with(6, 1), MessageError::Reserved);
    // Body length past the area: refused before anything is read.
    assert_eq!(with(18, 1), MessageError::TooLarge { len: 0x1_0000 });
    let mut bytes = good.clone();
    bytes.extend([0, 0, 1]);
    assert_eq!(
        Message::parse(&bytes).unwrap_err(),
        MessageError::TrailingBytes(3)
    );
}

#[test]
fn body_malformations() {
    let release = samples()[2].encode().unwrap();
    let with = |pos: usize, byte: u8| {
        let mut bytes = release.clone();
        bytes[pos] = byte;
        Message::parse(&bytes).unwrap_err()
    };
    // Body starts at 20: class, holder id length, "sev-1", key (32), evidence tag.
    assert_eq!(with(20, 9), MessageError::UnknownClass(9));
    assert!(matches!(with(22, b'S'), MessageError::HolderId(_)));
    assert_eq!(with(20 + 1 + 6 + 32, 5), MessageError::UnknownEvidence(5));
    let report_len_at = 20 + 1 + 6 + 32 + 1 + 32;
    let mut bytes = release.clone();
    bytes[report_len_at..report_len_at + 2].copy_from_slice(&0u16.to_le_bytes());
    assert!(matches!(
        Message::parse(&bytes).unwrap_err(),
        MessageError::FieldLength {
            field: "report",
            len: 0,
            ..
        }
    ));
    let mut bytes = release.clone();
    bytes[report_len_at..report_len_at + 2].copy_from_slice(&4001u16.to_le_bytes());
    assert!(matches!(
        Message::parse(&bytes).unwrap_err(),
        MessageError::FieldLength {
            field: "report",
            len: 4001,
            ..
        }
    ));
    // Extra bytes inside the declared body.
    let mut nonce = samples()[3].encode().unwrap();
    nonce[16] += 1;
    nonce.push(0xAA);
    assert_eq!(
        Message::parse(&nonce).unwrap_err(),
        MessageError::TrailingBytes(1)
    );
    // A reason that is not UTF-8.
    let mut refused = samples()
        .into_iter()
        .find(|m| matches!(m.body, Body::Refused { .. }))
        .unwrap()
        .encode()
        .unwrap();
    let last = refused.len() - 1;
    refused[last] = 0xFF;
    assert_eq!(
        Message::parse(&refused).unwrap_err(),
        MessageError::ReasonEncoding
    );
}

#[test]
fn encoding_refuses_oversized_fields_and_cuts_long_reasons() {
    let too_big = Message {
        request_id: 1,
        body: Body::Release {
            class: HolderClass::Sev,
            holder_id: holder("sev-1"),
            request_key: [0; 32],
            evidence: Evidence::Snp {
                nonce: [0; 32],
                report: vec![0; MAX_REPORT_LEN + 1],
                vcek: Vec::new(),
            },
        },
    };
    assert!(matches!(
        too_big.encode(),
        Err(MessageError::FieldLength {
            field: "report",
            ..
        })
    ));
    let long = Message {
        request_id: 2,
        body: Body::Refused {
            code: RefusalCode::Other(77),
            reason: "é".repeat(400),
        },
    };
    let Body::Refused { code, reason } = Message::parse(&long.encode().unwrap()).unwrap().body
    else {
        panic!("not a refusal");
    };
    assert_eq!(code, RefusalCode::Other(77));
    assert_eq!(reason.len(), MAX_REASON_LEN);
}

#[test]
fn refusal_codes_round_trip() {
    for code in 0..=14u16 {
        assert_eq!(RefusalCode::from_u16(code).to_u16(), code);
    }
    assert_eq!(RefusalCode::from_u16(11), RefusalCode::RateLimited);
    assert_eq!(RefusalCode::from_u16(12), RefusalCode::VmNotBound);
    assert_eq!(RefusalCode::from_u16(13), RefusalCode::HostShare);
}

/// Issue 8 item 4: a host quote's path side is 0 or 1, its length bounded, its tag known.
#[test]
fn item4_a_malformed_host_quote_is_refused() {
    let message = samples()
        .into_iter()
        .find(|m| {
            matches!(
                &m.body,
                Body::Released {
                    host_quote: Some(_),
                    ..
                }
            )
        })
        .unwrap();
    let bytes = message.encode().unwrap();
    // The quote starts after header, class, id, encapped key and ciphertext.
    let quote_at = HEADER_LEN + 1 + 1 + "tpm-1".len() + 32 + 2 + 181;
    assert_eq!(bytes[quote_at], 1);
    let mut bad_tag = bytes.clone();
    bad_tag[quote_at] = 7;
    assert_eq!(Message::parse(&bad_tag), Err(MessageError::UnknownQuote(7)));
    let side_at = quote_at + 1 + 2 + 145 + QUOTE_SIGNATURE_LEN + 1;
    assert_eq!(bytes[side_at], 1);
    let mut bad_side = bytes.clone();
    bad_side[side_at] = 2;
    assert_eq!(Message::parse(&bad_side), Err(MessageError::PathSide(2)));
    let mut too_deep = bytes.clone();
    too_deep[side_at - 1] = 17;
    assert!(matches!(
        Message::parse(&too_deep),
        Err(MessageError::FieldLength {
            field: "inclusion path",
            len: 17,
            ..
        })
    ));
}

fn host_released() -> Body {
    Body::HostReleased {
        holder_id: holder("host-2"),
        credential: KeyId::new("vm-key").unwrap(),
        epoch: 3,
        index: 2,
        host: "shard-host-eu".into(),
        released: vec![0x5a; 250],
    }
}

/// The bytes of a `host` share answer with its fields replaced.
fn host_released_with(f: impl FnOnce(&mut Body)) -> Vec<u8> {
    let mut body = host_released();
    f(&mut body);
    let message = Message {
        request_id: 1,
        body,
    };
    // Encode what the encoder accepts; build what it refuses by hand.
    message.encode().unwrap_or_default()
}

#[test]
fn item8_host_share_answers_refuse_bad_indexes_host_ids_and_sizes() {
    // The encoder refuses what the parser would.
    for bad in [
        host_released_with(|b| {
            if let Body::HostReleased { index, .. } = b {
                *index = 0;
            }
        }),
        host_released_with(|b| {
            if let Body::HostReleased { host, .. } = b {
                *host = "a host".into();
            }
        }),
        host_released_with(|b| {
            if let Body::HostReleased { host, .. } = b {
                *host = "h".repeat(65);
            }
        }),
        host_released_with(|b| {
            if let Body::HostReleased { released, .. } = b {
                *released = vec![1; crate::shard_release::MAX_RELEASED_LEN + 1];
            }
        }),
        host_released_with(|b| {
            if let Body::HostReleased { released, .. } = b {
                released.clear();
            }
        }),
    ] {
        assert!(bad.is_empty(), "encoded an invalid host share answer");
    }
    // The largest released shard fits the answer area and what the guest reads of it (4 KiB).
    let largest = host_released_with(|b| {
        if let Body::HostReleased { released, .. } = b {
            *released = vec![1; crate::shard_release::MAX_RELEASED_LEN];
        }
    });
    assert!(largest.len() <= 4096, "{}", largest.len());
    assert!(Message::parse(&largest).is_ok());

    // The parser refuses each of them, hand-made.
    let good = host_released_with(|_| {});
    // holder id "host-2" (1 + 6), credential "vm-key" (1 + 6), epoch (8): the index is next.
    let index_at = HEADER_LEN + 7 + 7 + 8;
    assert_eq!(good[index_at], 2);
    let mut zero = good.clone();
    zero[index_at] = 0;
    assert_eq!(Message::parse(&zero), Err(MessageError::ZeroIndex));
    let mut space = good.clone();
    space[index_at + 2] = b' ';
    assert!(matches!(Message::parse(&space), Err(MessageError::Name(_))));
    let mut credential = good.clone();
    credential[HEADER_LEN + 8] = b'/';
    assert!(matches!(
        Message::parse(&credential),
        Err(MessageError::Name(_))
    ));
    // A released shard declared empty.
    let released_at = index_at + 1 + 1 + "shard-host-eu".len();
    let mut empty = good[..released_at].to_vec();
    empty.extend_from_slice(&[0, 0]);
    let body_len = (empty.len() - HEADER_LEN) as u32;
    empty[16..20].copy_from_slice(&body_len.to_le_bytes());
    assert!(matches!(
        Message::parse(&empty),
        Err(MessageError::FieldLength {
            field: "released shard",
            len: 0,
            ..
        })
    ));
    // An unknown evidence tag is still refused past the new one.
    let mut release = Message {
        request_id: 1,
        body: Body::Release {
            class: HolderClass::Host,
            holder_id: holder("host-1"),
            request_key: [7; 32],
            evidence: Evidence::VmTpm,
        },
    }
    .encode()
    .unwrap();
    let tag = release.len() - 1;
    assert_eq!(release[tag], 3);
    release[tag] = 4;
    assert_eq!(
        Message::parse(&release),
        Err(MessageError::UnknownEvidence(4))
    );
}

/// The fuzz seeds of the new kinds parse (so the fuzzer starts from valid messages).
#[test]
fn item8_fuzz_seeds_of_host_kinds_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/broker_message");
    for name in ["release-host", "host-released"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let message = Message::parse(&bytes).unwrap();
        assert!(
            matches!(
                message.body,
                Body::Release {
                    evidence: Evidence::VmTpm,
                    ..
                } | Body::HostReleased { .. }
            ),
            "{name}"
        );
    }
}
