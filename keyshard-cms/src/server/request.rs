//! Request bodies: the one parser every endpoint's JSON goes through ([`parse_body`], pure, so it
//! is unit-tested and fuzzed without a server) and the axum extractor ([`ApiJson`]) that reads
//! the body under the size limit first and hands it to the parser.
//!
//! | body | answer |
//! |---|---|
//! | empty | read as `{}` (so `curl -X POST` works for requests whose fields are all optional) |
//! | more than the limit | 413 `body_too_large`: refused on its Content-Length (up to 1 MiB of it read and dropped first when the client is already sending), or while reading when it has none; nothing is parsed |
//! | a Content-Type other than `application/json` (parameters allowed) | 415 `unsupported_media_type` |
//! | not JSON, or JSON followed by more bytes | 400 `malformed_json` |
//! | JSON of the wrong shape: not an object, wrong type, unknown or missing field, value out of range | 422 `invalid_request` |
//!
//! Messages say where and what kind of mistake, never a string value from the request: serde's
//! `string "..."` is replaced by `a string`, and a message is cut at [`MAX_REASON_LEN`] bytes.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, EXPECT};
use serde::de::DeserializeOwned;
use zeroize::Zeroize as _;

use super::error::ApiError;

/// The longest reason a parse error carries, in bytes.
pub const MAX_REASON_LEN: usize = 200;

/// Parses a request body of at most `max_len` bytes, sent with `content_type`, into `T`.
pub fn parse_body<T: DeserializeOwned>(
    content_type: Option<&[u8]>,
    body: &[u8],
    max_len: usize,
) -> Result<T, ApiError> {
    if body.len() > max_len {
        return Err(ApiError::BodyTooLarge { max: max_len });
    }
    let body: &[u8] = if body.is_empty() {
        b"{}"
    } else {
        check_content_type(content_type)?;
        body
    };
    // serde reads a struct from an array too (`[5]` as `{"n": 5}`): only an object is a request.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Err(ApiError::InvalidRequest {
                reason: "the body must be a JSON object".to_owned(),
            }),
            Err(e) => Err(ApiError::MalformedJson {
                reason: describe(&e),
            }),
        };
    }
    serde_json::from_slice(body).map_err(|e| {
        let reason = describe(&e);
        match e.classify() {
            serde_json::error::Category::Data => ApiError::InvalidRequest { reason },
            _ => ApiError::MalformedJson { reason },
        }
    })
}

/// Accepts `application/json`, with parameters (`; charset=utf-8`), in any case.
fn check_content_type(content_type: Option<&[u8]>) -> Result<(), ApiError> {
    let Some(value) = content_type else {
        return Err(ApiError::UnsupportedMediaType {
            content_type: "no Content-Type".to_owned(),
        });
    };
    let essence = value
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if essence.eq_ignore_ascii_case(b"application/json") {
        return Ok(());
    }
    let shown: String = String::from_utf8_lossy(value)
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    Err(ApiError::UnsupportedMediaType {
        content_type: format!("{shown:?}"),
    })
}

/// serde_json's message with string values taken out, one line, at most [`MAX_REASON_LEN`] bytes.
fn describe(error: &serde_json::Error) -> String {
    let redacted = redact_strings(&error.to_string());
    let mut reason = String::with_capacity(MAX_REASON_LEN);
    for c in redacted.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if reason.len() + c.len_utf8() > MAX_REASON_LEN {
            break;
        }
        reason.push(c);
    }
    reason
}

/// Replaces each `string "..."` (serde's way of naming a string value it did not expect, with
/// the value escaped as Rust's Debug does) by `a string`.
fn redact_strings(message: &str) -> String {
    const MARK: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(MARK) {
        out.push_str(rest.get(..start).unwrap_or_default());
        out.push_str("a string");
        let after = rest.get(start + MARK.len()..).unwrap_or_default();
        let mut escaped = false;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = after.get(end..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

/// A JSON request body of type `T`, read under the router's body limit and parsed by
/// [`parse_body`]; every failure is an [`ApiError`].
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// The body limit the extractor enforces, set on the router as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let body = RawBody::read(request, state).await?;
        parse_body(body.content_type.as_deref(), &body.bytes, body.max).map(Self)
    }
}

/// Like [`ApiJson`], for a body that carries a secret (a credential, fragments): once parsed,
/// the body's buffer is wiped when this extractor holds its only reference.
#[derive(Debug)]
pub struct WipedJson<T>(pub T);

impl<S, T> FromRequest<S> for WipedJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let body = RawBody::read(request, state).await?;
        let parsed = parse_body(body.content_type.as_deref(), &body.bytes, body.max);
        if let Ok(mut owned) = body.bytes.try_into_mut() {
            owned.as_mut().zeroize();
        }
        parsed.map(Self)
    }
}

/// A request body read under the router's body limit, not parsed yet: what [`ApiJson`] parses,
/// for an extractor that must do something with the bytes after parsing ([`WipedJson`]).
#[derive(Debug)]
pub struct RawBody {
    pub content_type: Option<Vec<u8>>,
    pub bytes: Bytes,
    /// The body limit it was read under.
    pub max: usize,
}

impl RawBody {
    /// Reads the body; refuses an oversized or unreadable one as every endpoint does.
    pub async fn read<S: Send + Sync>(request: Request, state: &S) -> Result<Self, ApiError> {
        /// The largest refused body still read (and dropped) so its client gets the answer.
        const MAX_DRAINED_BODY: usize = 1024 * 1024;
        let max = request
            .extensions()
            .get::<BodyLimit>()
            .map_or(super::DEFAULT_MAX_BODY, |limit| limit.0);
        // A declared length over the limit is refused before the body is touched: hyper then
        // sends no `100 Continue`, and a client that asked for one (curl does for large bodies)
        // reads the 413 instead of uploading.
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if let Some(len) = declared
            && len > u64::try_from(max).unwrap_or(u64::MAX)
        {
            // A client that did not ask for `100 Continue` is already sending: a body of modest
            // size is read and dropped (bounded by the request timeout), so it reads the 413
            // instead of a broken pipe. A larger one is cut, as one that waits is never read.
            let expects_continue = request
                .headers()
                .get(EXPECT)
                .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if !expects_continue && len <= MAX_DRAINED_BODY as u64 {
                let _ = axum::body::to_bytes(request.into_body(), MAX_DRAINED_BODY).await;
            }
            return Err(ApiError::BodyTooLarge { max });
        }
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .map(|value| value.as_bytes().to_vec());
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::BodyTooLarge { max }
                } else {
                    ApiError::BodyUnreadable {
                        reason: rejection.body_text().chars().take(MAX_REASON_LEN).collect(),
                    }
                }
            })?;
        Ok(Self {
            content_type,
            bytes: body,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Probe {
        #[serde(default)]
        n: Option<u32>,
        #[serde(default)]
        s: Option<String>,
    }

    const JSON: Option<&[u8]> = Some(b"application/json");

    fn parse(content_type: Option<&[u8]>, body: &str) -> Result<Probe, ApiError> {
        parse_body(content_type, body.as_bytes(), 64)
    }

    #[test]
    fn good_bodies_parse_and_an_empty_one_is_an_empty_object() {
        assert_eq!(
            parse(JSON, r#"{"n": 5}"#).unwrap(),
            Probe {
                n: Some(5),
                s: None
            }
        );
        assert_eq!(parse(None, "").unwrap(), Probe { n: None, s: None });
        let with_charset = Some(&b"Application/JSON ; charset=utf-8"[..]);
        assert!(parse(with_charset, "{}").is_ok());
    }

    #[test]
    fn each_kind_of_bad_body_gets_its_own_code() {
        for (content_type, body, code) in [
            (None, "{}", "unsupported_media_type"),
            (Some(&b"text/plain"[..]), "{}", "unsupported_media_type"),
            (
                Some(&b"application/jsonx"[..]),
                "{}",
                "unsupported_media_type",
            ),
            (JSON, "{", "malformed_json"),
            (JSON, "{} {}", "malformed_json"),
            (JSON, "\u{0}", "malformed_json"),
            (JSON, r#"{"n": "5"}"#, "invalid_request"),
            (JSON, r#"{"n": -1}"#, "invalid_request"),
            (JSON, r#"{"n": 99999999999}"#, "invalid_request"),
            (JSON, r#"{"x": 1}"#, "invalid_request"),
            (JSON, "[]", "invalid_request"),
            (JSON, "[5]", "invalid_request"),
            (JSON, " 7", "invalid_request"),
            (JSON, "[", "malformed_json"),
            (JSON, "null", "invalid_request"),
            (JSON, &"9".repeat(65), "body_too_large"),
        ] {
            let Err(err) = parse(content_type, body) else {
                panic!("{body:?} parsed");
            };
            assert_eq!(err.code(), code, "{body:?}: {err}");
            assert!(!err.to_string().contains('\n'), "{body:?}: {err}");
        }
    }

    #[test]
    fn string_values_from_the_request_are_not_echoed() {
        let err = parse(JSON, r#"{"n": "hunter2 \"quoted\" tail"}"#).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.code(), "invalid_request");
        assert!(text.contains("a string"), "{text}");
        for part in ["hunter2", "quoted", "tail"] {
            assert!(!text.contains(part), "{text}");
        }
        assert_eq!(
            redact_strings(r#"invalid type: string "a\"b", expected u32 string "c""#),
            "invalid type: a string, expected u32 a string"
        );
        assert_eq!(redact_strings(r#"string "unterminated"#), "a string");
    }

    proptest::proptest! {
        /// What the fuzz target checks, on every `cargo test`: any bytes under any of the
        /// Content-Types give a value or a bounded one-line refusal, never a panic.
        #[test]
        fn any_body_gets_a_value_or_a_bounded_refusal(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            json_like in r#"[{}\[\]":, 0-9a-z_-]{0,64}"#,
            typed in proptest::bool::ANY,
        ) {
            let content_type = typed.then_some(&b"application/json"[..]);
            for bytes in [&body[..], json_like.as_bytes()] {
                if let Err(err) = parse_body::<Probe>(content_type, bytes, 128) {
                    let text = err.to_string();
                    proptest::prop_assert!(!text.contains('\n'), "{}", text);
                    proptest::prop_assert!(text.len() <= MAX_REASON_LEN + 64, "{}", text);
                }
            }
        }
    }

    #[test]
    fn reasons_are_bounded() {
        let long_field = format!(r#"{{"{}": 1}}"#, "f".repeat(500));
        let err = parse_body::<Probe>(JSON, long_field.as_bytes(), 4096).unwrap_err();
        let ApiError::InvalidRequest { reason } = err else {
            panic!("{err:?}");
        };
        assert!(reason.len() <= MAX_REASON_LEN, "{reason}");
    }
}
