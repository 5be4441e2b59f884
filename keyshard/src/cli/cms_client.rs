//! The CMS's HTTPS client as every `keyshard` command that talks to the CMS uses it
//! (`credential`, `instance enroll`, and the enrolment of [`super::enrol`]): JSON requests to
//! `--cms`, trusting only `--ca`, with the timeouts and bounded answers of
//! [`super::credential`] (whose transport functions it wraps), and the CMS's refusals as one
//! line naming its error code.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::CliError;
use super::credential::{CmsConfig, CredentialCliError, https_client, parse, read_answer};

/// A client of one CMS: its base URL and an HTTPS client trusting only its CA.
#[derive(Debug, Clone)]
pub struct CmsClient {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl CmsClient {
    /// A client for the validated `--cms`, `--ca` and `--timeout` (reads the CA file).
    pub fn new(config: &CmsConfig) -> Result<Self, CliError> {
        Ok(Self {
            http: https_client(config)?,
            base: config.base.clone(),
            timeout: config.timeout,
        })
    }

    /// The CMS's base URL, `https://HOST:PORT`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`; the answer parsed as `T` (`what` names it in errors).
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        what: &'static str,
    ) -> Result<T, CliError> {
        let url = format!("{}{path}", self.base);
        let sent = self.http.get(&url).send().await;
        parse(&read_answer(sent, &url, self.timeout).await?, what)
    }

    /// `POST path` with `body` as JSON; the answer parsed as `T`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &'static str,
    ) -> Result<T, CliError> {
        self.send(reqwest::Method::POST, path, body, what).await
    }

    /// `PUT path` with `body` as JSON; the answer parsed as `T`.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &'static str,
    ) -> Result<T, CliError> {
        self.send(reqwest::Method::PUT, path, body, what).await
    }

    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
        what: &'static str,
    ) -> Result<T, CliError> {
        let body =
            serde_json::to_vec(body).map_err(|e| CredentialCliError::Client(e.to_string()))?;
        let url = format!("{}{path}", self.base);
        let sent = self
            .http
            .request(method, &url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        parse(&read_answer(sent, &url, self.timeout).await?, what)
    }
}
