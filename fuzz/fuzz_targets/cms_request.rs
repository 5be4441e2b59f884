//! Fuzzes the credential service's request parsing, which reads what any network client sends:
//! the first byte picks the Content-Type and the request type (nonce, host registration,
//! credential put, map query, enrolment, activation, instance registration, a shard host's
//! release, a fetch), the rest is the body (or the query). Nothing may panic; an accepted
//! request re-encodes to JSON that parses to the same value and is then converted to its typed
//! form (which may refuse it); a refusal is one bounded line with one of the parser's codes.

#![no_main]

use std::time::Duration;

use keyshard_cms::server::credentials::{PutCredentialRequest, client_query, parse_client_key};
use keyshard_cms::server::enrolment::{ActivationBody, EnrolmentBody};
use keyshard_cms::server::fetch::FetchRequest;
use keyshard_cms::server::hosts::HostRegistrationRequest;
use keyshard_cms::server::instances::InstanceRegistrationBody;
use keyshard_cms::server::{ApiError, NonceRequest, parse_body};
use keyshard_cms::shard_host::server::ReleaseRequest;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

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
    match (selector / 4) % 9 {
        0 => {
            if let Some(request) = round_trip::<NonceRequest>(content_type, body) {
                let _ = request.ttl(Duration::from_secs(30));
            }
        }
        1 => {
            if let Some(request) = round_trip::<HostRegistrationRequest>(content_type, body) {
                let id = String::from_utf8_lossy(body.get(..8).unwrap_or_default()).into_owned();
                check_refusal(request.into_registration(&id).err(), REQUEST_CODES);
            }
        }
        2 => {
            if let Some(request) = round_trip::<PutCredentialRequest>(content_type, body) {
                check_refusal(request.parse().err(), REQUEST_CODES);
            }
        }
        4 => {
            if let Some(request) = round_trip::<EnrolmentBody>(content_type, body) {
                check_refusal(request.into_request().err(), REQUEST_CODES);
            }
        }
        5 => {
            let _ = round_trip::<ActivationBody>(content_type, body);
        }
        6 => {
            if let Some(request) = round_trip::<InstanceRegistrationBody>(content_type, body) {
                let id = String::from_utf8_lossy(body.get(..8).unwrap_or_default()).into_owned();
                check_refusal(request.into_registration(&id).err(), REQUEST_CODES);
            }
        }
        7 => {
            if let Some(request) = round_trip::<ReleaseRequest>(content_type, body) {
                check_refusal(request.parse().err(), REQUEST_CODES);
            }
        }
        8 => {
            if let Some(request) = round_trip::<FetchRequest>(content_type, body) {
                check_refusal(request.parse().err(), REQUEST_CODES);
            }
        }
        _ => {
            let query = String::from_utf8_lossy(body);
            match client_query(Some(&query)) {
                Ok(client) => check_refusal(parse_client_key(&client).err(), REQUEST_CODES),
                Err(error) => check_refusal(Some(error), REQUEST_CODES),
            }
        }
    }
});

/// The codes a body parser may refuse with.
const PARSER_CODES: &[&str] = &[
    "unsupported_media_type",
    "malformed_json",
    "invalid_request",
    "body_too_large",
];

/// The code a typed conversion may refuse with.
const REQUEST_CODES: &[&str] = &["invalid_request"];

/// Parses `body` as `T`; an accepted value must re-encode to JSON that parses to itself.
fn round_trip<T>(content_type: Option<&[u8]>, body: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    match parse_body::<T>(content_type, body, MAX_BODY) {
        Ok(request) => {
            let encoded = serde_json::to_vec(&request).expect("a request encodes");
            let again = parse_body::<T>(Some(b"application/json"), &encoded, MAX_BODY)
                .expect("its encoding parses");
            assert_eq!(again, request);
            Some(request)
        }
        Err(error) => {
            check_refusal(Some(error), PARSER_CODES);
            None
        }
    }
}

fn check_refusal(error: Option<ApiError>, codes: &[&str]) {
    let Some(error) = error else { return };
    let message = error.to_string();
    assert!(!message.contains('\n'), "{message:?}");
    assert!(message.len() <= 400, "{} bytes", message.len());
    assert!(codes.contains(&error.code()), "{}", error.code());
}
