//! Store keys and key prefixes: the alphabet and segment rules of the key layout (see the
//! `store` module's overview), checked once when a [`Key`] or [`KeyPrefix`] is made.

use super::{Result, StoreError};

/// The longest key or prefix, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// A checked store key: `/`-separated segments of `A-Z a-z 0-9 - _ . : @ + = ~`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    /// Checks `key` against the layout's rules.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        if key.is_empty() {
            return Err(invalid(&key, "empty"));
        }
        check_text(&key)?;
        for segment in key.split('/') {
            check_segment(&key, segment)?;
        }
        Ok(Self(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Key {
    type Err = StoreError;

    fn from_str(key: &str) -> Result<Self> {
        Self::new(key)
    }
}

/// A checked key prefix: empty (every key), or what a key may start with, `/` allowed at the end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// Checks `prefix`: the key alphabet, no empty segment except after a final `/`.
    pub fn new(prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        if prefix.is_empty() {
            return Ok(Self(prefix));
        }
        check_text(&prefix)?;
        let body = prefix.strip_suffix('/').unwrap_or(&prefix);
        if body.is_empty() {
            return Err(invalid(&prefix, "a prefix cannot start with '/'"));
        }
        let mut segments = body.split('/').peekable();
        while let Some(segment) = segments.next() {
            // Without a final '/', the last segment may be the start of one ("hosts/h" lists
            // "hosts/h1", "a/." lists "a/.x"): it only has to be non-empty.
            if segments.peek().is_none() && !prefix.ends_with('/') {
                if segment.is_empty() {
                    return Err(invalid(&prefix, "empty segment"));
                }
                continue;
            }
            check_segment(&prefix, segment)?;
        }
        Ok(Self(prefix))
    }

    /// The prefix that matches every key.
    pub fn all() -> Self {
        Self(String::new())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `key` starts with this prefix.
    pub fn matches(&self, key: &str) -> bool {
        key.starts_with(&self.0)
    }
}

impl std::fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn invalid(key: &str, reason: &'static str) -> StoreError {
    // A refused key may come from the network: keep the message one bounded line.
    let shown: String = key.chars().take(MAX_KEY_LEN).collect();
    StoreError::InvalidKey { key: shown, reason }
}

fn check_text(key: &str) -> Result<()> {
    if key.len() > MAX_KEY_LEN {
        return Err(invalid(key, "longer than 256 bytes"));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:@+=~/".contains(&b))
    {
        return Err(invalid(
            key,
            "only A-Z a-z 0-9 - _ . : @ + = ~ and '/' between segments",
        ));
    }
    Ok(())
}

fn check_segment(key: &str, segment: &str) -> Result<()> {
    match segment {
        "" => Err(invalid(
            key,
            "empty segment (leading, trailing or doubled '/')",
        )),
        "." | ".." => Err(invalid(key, "'.' and '..' are not segments")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        for good in ["hosts/h1", "a", "credentials/db:prod/epochs/3", "x/.y/z~1"] {
            assert_eq!(Key::new(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "/hosts",
            "hosts/",
            "hosts//h1",
            "hosts/../x",
            ".",
            "hosts/h 1",
            "hosts/é",
            "a\0b",
        ] {
            let err = Key::new(bad).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidKey { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(Key::new("a".repeat(MAX_KEY_LEN)).is_ok());
        assert!(Key::new("a".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn prefixes_may_be_empty_cut_or_end_with_a_slash() {
        for good in ["", "hosts/", "hosts/h", "hosts", "a/b/"] {
            assert_eq!(KeyPrefix::new(good).unwrap().as_str(), good);
        }
        for bad in ["/", "/hosts", "hosts//", "a//b", "../", "a/./", "h t"] {
            assert!(KeyPrefix::new(bad).is_err(), "{bad:?}");
        }
        let prefix = KeyPrefix::new("hosts/h1").unwrap();
        assert!(prefix.matches("hosts/h1") && prefix.matches("hosts/h10"));
        assert!(!prefix.matches("hosts/h2"));
        assert!(KeyPrefix::all().matches("anything"));
    }
}
