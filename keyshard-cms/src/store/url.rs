//! Store URLs: `redb:PATH` and `etcd:http://HOST:PORT[,http://HOST:PORT...]`, parsed into a
//! [`StoreUrl`] with one clear line for each way one can be wrong.

use std::path::PathBuf;

use super::{Result, StoreError};

/// The most etcd endpoints one URL may list.
const MAX_ENDPOINTS: usize = 16;

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An embedded redb file, created when missing.
    Redb(PathBuf),
    /// The client endpoints of one etcd cluster (v3 API), plain HTTP.
    Etcd(Vec<EtcdEndpoint>),
}

/// One etcd client endpoint, `http://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    host: String,
    port: u16,
}

impl EtcdEndpoint {
    /// The endpoint as etcd-client takes it.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

impl std::fmt::Display for EtcdEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url())
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self> {
        let error = |reason: String| StoreError::Url {
            url: url.chars().take(200).collect(),
            reason,
        };
        if let Some(path) = url.strip_prefix("redb:") {
            if path.is_empty() {
                return Err(error("no path after 'redb:' (want redb:PATH)".to_owned()));
            }
            return Ok(Self::Redb(PathBuf::from(path)));
        }
        if let Some(list) = url.strip_prefix("etcd:") {
            if list.is_empty() {
                return Err(error(
                    "no endpoint after 'etcd:' (want etcd:http://HOST:PORT,...)".to_owned(),
                ));
            }
            let endpoints = list
                .split(',')
                .map(parse_endpoint)
                .collect::<std::result::Result<Vec<_>, String>>()
                .map_err(error)?;
            if endpoints.len() > MAX_ENDPOINTS {
                return Err(error(format!(
                    "{} endpoints; at most {MAX_ENDPOINTS}",
                    endpoints.len()
                )));
            }
            return Ok(Self::Etcd(endpoints));
        }
        Err(error(
            "unknown store; want redb:PATH or etcd:http://HOST:PORT[,http://HOST:PORT...]"
                .to_owned(),
        ))
    }
}

/// `http://HOST:PORT` with an optional final `/`; HOST a name, an IPv4 address or `[IPv6]`.
fn parse_endpoint(text: &str) -> std::result::Result<EtcdEndpoint, String> {
    if text.starts_with("https://") {
        return Err(format!(
            "endpoint {text:?}: TLS to etcd is not supported yet; use http:// on a trusted network"
        ));
    }
    let Some(rest) = text.strip_prefix("http://") else {
        return Err(format!("endpoint {text:?}: want http://HOST:PORT"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "endpoint {text:?}: want http://HOST:PORT, without path, query or user"
        ));
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(format!(
            "endpoint {text:?}: no port (want http://HOST:PORT)"
        ));
    };
    let port = match port.parse::<u16>() {
        Ok(port) if port != 0 => port,
        _ => {
            return Err(format!(
                "endpoint {text:?}: port {port:?} is not a number in 1..=65535"
            ));
        }
    };
    let valid_host = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !valid_host {
        return Err(format!(
            "endpoint {text:?}: host {host:?} is not a host name, an IPv4 address or [IPv6]"
        ));
    }
    Ok(EtcdEndpoint {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_urls_parse() {
        assert_eq!(
            "redb:/var/lib/keyshard/cms.redb"
                .parse::<StoreUrl>()
                .unwrap(),
            StoreUrl::Redb(PathBuf::from("/var/lib/keyshard/cms.redb"))
        );
        let StoreUrl::Etcd(endpoints) =
            "etcd:http://127.0.0.1:2379,http://etcd-2.lan:2379/,http://[::1]:23790"
                .parse::<StoreUrl>()
                .unwrap()
        else {
            panic!("not etcd");
        };
        let urls: Vec<String> = endpoints.iter().map(EtcdEndpoint::url).collect();
        assert_eq!(
            urls,
            [
                "http://127.0.0.1:2379",
                "http://etcd-2.lan:2379",
                "http://[::1]:23790"
            ]
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("", "unknown store"),
            ("redb:", "no path"),
            ("sqlite:/x", "unknown store"),
            ("/var/lib/cms.redb", "unknown store"),
            ("etcd:", "no endpoint"),
            ("etcd:127.0.0.1:2379", "want http://HOST:PORT"),
            (
                "etcd:https://127.0.0.1:2379",
                "TLS to etcd is not supported",
            ),
            ("etcd:http://127.0.0.1", "no port"),
            ("etcd:http://127.0.0.1:0", "not a number in 1..=65535"),
            ("etcd:http://127.0.0.1:65536", "not a number in 1..=65535"),
            ("etcd:http://127.0.0.1:x", "not a number"),
            ("etcd:http://:2379", "not a host name"),
            ("etcd:http://[::1:2379", "not a host name"),
            ("etcd:http://h_1:2379", "not a host name"),
            ("etcd:http://127.0.0.1:2379/v3", "without path"),
            ("etcd:http://u@h:2379", "without path"),
            ("etcd:http://127.0.0.1:2379,", "want http://HOST:PORT"),
        ] {
            let err = url.parse::<StoreUrl>().unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, StoreError::Url { .. }), "{url:?}: {text}");
            assert!(text.contains(says), "{url:?}: {text}");
            assert!(!text.contains('\n'), "{url:?}: {text}");
        }
        let many = format!("etcd:{}", vec!["http://h:1"; MAX_ENDPOINTS + 1].join(","));
        assert!(
            many.parse::<StoreUrl>()
                .unwrap_err()
                .to_string()
                .contains("at most")
        );
    }
}
