//! HTTP traffic through lb-gateway to the demo instances, every answer recorded (when, which
//! key, status, which instance), and the gateway's own view (its metrics) for the killed
//! instance.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound on one request through the gateway.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// One answer (or failure) seen by a client.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When the request was sent.
    pub sent: Instant,
    /// The key (path `/load/<key>`).
    pub key: u32,
    /// HTTP status; 0 for a transport error or timeout.
    pub status: u16,
    /// The instance that answered (`x-demo-instance`).
    pub instance: Option<String>,
    /// For a failure: the start of the answer's body, or the transport error.
    pub detail: Option<String>,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.status == 200 && self.instance.is_some()
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

/// One GET through the gateway.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, Option<String>, String) {
    one(&client(), addr, path).await
}

async fn one(client: &HttpClient, addr: SocketAddr, path: &str) -> (u16, Option<String>, String) {
    let uri: hyper::Uri = match format!("http://{addr}{path}").parse() {
        Ok(u) => u,
        Err(e) => return (0, None, format!("bad uri: {e}")),
    };
    let call = async {
        let resp = client.get(uri).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let instance = resp
            .headers()
            .get("x-demo-instance")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((
            status,
            instance,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => (0, None, e),
        Err(_) => (0, None, "timed out".into()),
    }
}

/// Clients sending `GET /load/<key>` through the gateway until stopped (bounded in count).
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    samples: Arc<Mutex<Vec<Sample>>>,
}

/// Concurrent clients of the load.
const CLIENTS: u32 = 4;
/// Keys the load spreads over.
pub const KEYS: u32 = 48;
/// Pause between one client's requests (4 clients: at most ~200 requests/s).
const PACE: Duration = Duration::from_millis(20);
/// Bound on one client's requests.
const MAX_PER_CLIENT: u32 = 30_000;

impl Load {
    pub fn start(addr: SocketAddr) -> Load {
        let stop = CancellationToken::new();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..CLIENTS)
            .map(|c| {
                let (stop, samples) = (stop.clone(), samples.clone());
                tokio::spawn(async move {
                    let http = client();
                    for n in 0..MAX_PER_CLIENT {
                        if stop.is_cancelled() {
                            return;
                        }
                        let key = (n * CLIENTS + c) % KEYS;
                        let sent = Instant::now();
                        let (status, instance, body) =
                            one(&http, addr, &format!("/load/{key}")).await;
                        let detail = (status != 200).then(|| body.chars().take(160).collect());
                        samples.lock().expect("samples").push(Sample {
                            sent,
                            key,
                            status,
                            instance,
                            detail,
                        });
                        tokio::time::sleep(PACE).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            samples,
        }
    }

    /// Samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// Stops the clients; every sample.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, t).await;
        }

        self.samples.lock().expect("samples").clone()
    }
}

/// Failed samples sent in `[from, to)`.
pub fn failures(samples: &[Sample], from: Instant, to: Instant) -> Vec<&Sample> {
    samples
        .iter()
        .filter(|s| s.sent >= from && s.sent < to && !s.ok())
        .collect()
}

/// Samples sent in `[from, to)`.
pub fn count(samples: &[Sample], from: Instant, to: Instant) -> usize {
    samples
        .iter()
        .filter(|s| s.sent >= from && s.sent < to)
        .count()
}

/// Which instances answered each key in `[from, to)`.
pub fn owners(samples: &[Sample], from: Instant, to: Instant) -> BTreeMap<u32, BTreeSet<String>> {
    let mut map: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.sent >= from && s.sent < to && s.ok())
    {
        if let Some(i) = &s.instance {
            map.entry(s.key).or_default().insert(i.clone());
        }
    }
    map
}

/// The gateway's tries at backends whose id (`host:port`) starts with `host:` — answered
/// (`lb_gateway_backend_requests_total`) plus failed connects and tries without an answer
/// (`lb_gateway_backend_connect_failures_total`) — from its `/metrics` (0 once the backend
/// has left the set and its series are gone). `None` if the admin server does not answer.
pub async fn tries_at(admin: SocketAddr, host: &str) -> Option<f64> {
    let (status, _, text) = get(admin, "/metrics").await;
    if status != 200 {
        return None;
    }
    let label = format!("backend=\"{host}:");
    let total = text
        .lines()
        .filter(|l| {
            (l.starts_with("lb_gateway_backend_requests_total{")
                || l.starts_with("lb_gateway_backend_connect_failures_total{"))
                && l.contains(&label)
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .fold(0.0, |a, b| a + b);
    Some(total)
}
