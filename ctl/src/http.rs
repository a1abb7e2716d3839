//! A small HTTP/1.1 GET client (hyper) for admin servers: lb-gateway's JSON API and every
//! service's `/healthz` and `/readyz`. `https://` addresses are dialled over TLS with
//! `--cacert` (and `--cert`/`--key`), through `service_kit::tls::HttpsConnector`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use service_kit::tls::HttpsConnector;
use service_kit::tls::rustls::ClientConfig;

use crate::error::{CtlError, io_words};

/// An HTTP client for one command's requests.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpsConnector, Empty<Bytes>>,
    timeout: Duration,
}

/// An answer: status code and body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body as text.
    pub body: String,
}

impl Answer {
    /// The body parsed as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// `http://addr` unless `addr` already has a scheme, without a trailing slash.
pub fn base_url(addr: &str) -> String {
    let addr = addr.trim().trim_end_matches('/');
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

impl Http {
    /// A client whose requests each take at most `timeout`, dialling `https://` addresses
    /// with `tls` (an `https://` address without it fails, saying so).
    pub fn new(timeout: Duration, tls: Option<std::sync::Arc<ClientConfig>>) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build(HttpsConnector::new(tls, timeout)),
            timeout,
        }
    }

    /// GETs `path` from the admin server at `addr` (`service` names it in errors).
    pub async fn get(
        &self,
        service: &'static str,
        addr: &str,
        path: &str,
    ) -> Result<Answer, CtlError> {
        let url = format!("{}{path}", base_url(addr));
        let uri: http::Uri = url.parse().map_err(|e| {
            CtlError::Usage(format!("{service} address {addr:?} is not valid: {e}"))
        })?;
        let exchange = async {
            let resp = self.client.get(uri).await.map_err(|e| {
                let mut detail = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(err) = source {
                    detail = match err.downcast_ref::<std::io::Error>() {
                        Some(io) => io_words(io),
                        None => err.to_string(),
                    };
                    source = err.source();
                }
                CtlError::Unreachable {
                    service,
                    addr: addr.to_owned(),
                    detail,
                }
            })?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CtlError::Unreachable {
                    service,
                    addr: addr.to_owned(),
                    detail: format!("the answer broke off: {e}"),
                })?
                .to_bytes();
            Ok(Answer {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(CtlError::Timeout {
                service,
                addr: addr.to_owned(),
                timeout: self.timeout,
            }),
        }
    }

    /// GETs a JSON document; a non-2xx answer becomes [`CtlError::Refused`] with the body's
    /// `error` text.
    pub async fn get_json(
        &self,
        service: &'static str,
        addr: &str,
        path: &str,
    ) -> Result<Value, CtlError> {
        let answer = self.get(service, addr, path).await?;
        let json = answer.json();
        if !(200..300).contains(&answer.status) {
            let message = json
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| answer.body.trim().to_owned());
            return Err(CtlError::Refused {
                service,
                code: format!("HTTP {}", answer.status),
                message,
            });
        }
        if json.is_null() {
            return Err(CtlError::Refused {
                service,
                code: format!("HTTP {}", answer.status),
                message: format!("{path} did not answer JSON"),
            });
        }
        Ok(json)
    }
}
