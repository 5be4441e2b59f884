//! Fuzzes the credential service's request body parser, which reads what any network client
//! sends: the first byte picks the Content-Type, the rest is the body. Nothing may panic; an
//! accepted request re-encodes to JSON that parses to the same value, and a refusal is one
//! bounded line with one of the parser's codes.

#![no_main]

use std::time::Duration;

use keyshard_cms::server::{NonceRequest, parse_body};
use libfuzzer_sys::fuzz_target;

/// The server's default body limit.
const MAX_BODY: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type: Option<&[u8]> = match selector % 4 {
        0 => None,
        1 => Some(b"application/json"),
        2 => Some(b"application/json; charset=utf-8"),
        _ => Some(body.get(..body.len().min(16)).unwrap_or_default()),
    };
    match parse_body::<NonceRequest>(content_type, body, MAX_BODY) {
        Ok(request) => {
            let encoded = serde_json::to_vec(&request).expect("a request encodes");
            let again = parse_body::<NonceRequest>(Some(b"application/json"), &encoded, MAX_BODY)
                .expect("its encoding parses");
            assert_eq!(again, request);
            let _ = request.ttl(Duration::from_secs(30));
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.contains('\n'), "{message:?}");
            assert!(message.len() <= 400, "{} bytes", message.len());
            assert!(
                [
                    "unsupported_media_type",
                    "malformed_json",
                    "invalid_request",
                    "body_too_large"
                ]
                .contains(&error.code()),
                "{}",
                error.code()
            );
        }
    }
});
