//! Where the dashboard's panels come from: the coordinator (gRPC, each member's
//! `Maintenance.Status`), the registry (gRPC, through the gateway's own client) and config-svc
//! (REST). Each call is bounded by [`CALL_TIMEOUT`] and its failure becomes a
//! [`DashboardError`] naming the upstream.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use proto::etcdserverpb as etcd;
use proto::etcdserverpb::cluster_client::ClusterClient;
use proto::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::registry_v1 as pb;
use registry_svc::client::RegistryClient;
use serde_json::{Value, json};
use service_kit::tls::HttpsConnector;
use service_kit::tls::rustls::ClientConfig;
use tokio::task::JoinSet;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::{CALL_TIMEOUT, DashboardError};

const COORDINATOR: &str = "coordinator";
const REGISTRY: &str = "registry";
const CONFIG: &str = "config-svc";

/// How long opening a connection to an upstream may take (less than [`CALL_TIMEOUT`], so a
/// peer that cannot be reached is told from one that does not answer).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Most items listed per config namespace.
const ITEMS_PAGE: u32 = 500;
/// Most versions listed in an item's history.
const HISTORY_PAGE: u32 = 100;

/// Runs `call` under [`CALL_TIMEOUT`].
async fn bounded<T>(
    source_name: &'static str,
    call: impl Future<Output = Result<T, DashboardError>>,
) -> Result<T, DashboardError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or(Err(DashboardError::Timeout { source_name }))
}

/// A gRPC failure of `source_name` as a dashboard error.
fn from_status(source_name: &'static str, status: &tonic::Status) -> DashboardError {
    let message = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_owned()
    };
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => DashboardError::Unreachable {
            source_name,
            message,
        },
        tonic::Code::DeadlineExceeded => DashboardError::Timeout { source_name },
        _ => DashboardError::Upstream {
            source_name,
            status: StatusCode::BAD_GATEWAY,
            message,
        },
    }
}

/// Whether `url` asks for TLS (`https://`).
fn is_https(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("https"))
}

/// A lazy channel to a coordinator endpoint: over TLS (`tls`, the gateway's `--client-*`
/// files) for an `https://` URL, plain TCP otherwise.
fn lazy_channel(url: &str, tls: Option<&Arc<ClientConfig>>) -> Result<Channel, String> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let tls = if is_https(&url) {
        Some(tls.ok_or_else(|| {
            format!(
                "coordinator endpoint {url:?} is https:// but no --client-cacert was given to check its certificate"
            )
        })?)
    } else {
        None
    };
    Endpoint::from_shared(service_kit::tls::plain_scheme(&url))
        // No per-request timeout here: `bounded` answers 504 when a call takes too long; a
        // connection that cannot even be opened is "unreachable" (502) sooner.
        .map(|e| service_kit::tls::lazy_channel(e.connect_timeout(CONNECT_TIMEOUT), tls))
        .map_err(|e| format!("coordinator endpoint {url:?}: {e}"))
}

/// `req` carrying the coordinator token (gRPC metadata `token`, as etcd's clients send it).
fn with_token<T>(req: T, token: Option<&AsciiMetadataValue>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(req);
    if let Some(token) = token {
        req.metadata_mut().insert("token", token.clone());
    }
    req
}

// ---- coordinator ----------------------------------------------------------------------------

/// The coordinator cluster as the dashboard sees it.
pub struct Cluster {
    /// The configured endpoints and their channels.
    endpoints: Vec<(String, Channel)>,
    /// Channels to members' advertised client URLs, opened on first use.
    by_url: Mutex<HashMap<String, Channel>>,
    /// TLS for `https://` endpoints (the gateway's `--client-*` files).
    tls: Option<Arc<ClientConfig>>,
    /// The coordinator token sent with every call, when its auth is on.
    token: Option<AsciiMetadataValue>,
}

/// What `Maintenance.Status` of one member said, or why it did not answer.
type StatusResult = Result<etcd::StatusResponse, DashboardError>;

async fn status_of(channel: Channel, token: Option<AsciiMetadataValue>) -> StatusResult {
    bounded(COORDINATOR, async move {
        MaintenanceClient::new(channel)
            .status(with_token(etcd::StatusRequest {}, token.as_ref()))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| from_status(COORDINATOR, &s))
    })
    .await
}

fn hex(id: u64) -> String {
    format!("{id:x}")
}

impl Cluster {
    /// Lazy channels to `endpoints` (`https://` ones over `tls`), calling with `token` (empty:
    /// none).
    pub fn new(
        endpoints: &[String],
        tls: Option<Arc<ClientConfig>>,
        token: &str,
    ) -> Result<Cluster, String> {
        let endpoints = endpoints
            .iter()
            .map(|e| Ok((e.clone(), lazy_channel(e, tls.as_ref())?)))
            .collect::<Result<_, String>>()?;
        let token = if token.is_empty() {
            None
        } else {
            Some(
                MetadataValue::try_from(token)
                    .map_err(|_| "the coordinator token is not a valid header value".to_owned())?,
            )
        };
        Ok(Cluster {
            endpoints,
            by_url: Mutex::new(HashMap::new()),
            tls,
            token,
        })
    }

    fn channel_for(&self, url: &str) -> Result<Channel, String> {
        let mut cached = self.by_url.lock();
        if let Some(c) = cached.get(url) {
            return Ok(c.clone());
        }
        let channel = lazy_channel(url, self.tls.as_ref())?;
        cached.insert(url.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Every member with its status. The configured endpoints are asked first (they are the
    /// addresses that work from here); members reached through none of them are asked at the
    /// first client URL they advertise.
    pub async fn view(&self) -> Result<Value, DashboardError> {
        let mut asks = JoinSet::new();
        for (i, (_, channel)) in self.endpoints.iter().enumerate() {
            let (channel, token) = (channel.clone(), self.token.clone());
            asks.spawn(async move { (i, status_of(channel, token).await) });
        }
        let mut by_endpoint: Vec<Option<StatusResult>> =
            (0..self.endpoints.len()).map(|_| None).collect();
        while let Some(joined) = asks.join_next().await {
            if let Ok((i, result)) = joined {
                by_endpoint[i] = Some(result);
            }
        }
        // Member ID → (status, the endpoint that answered).
        let mut statuses: HashMap<u64, (etcd::StatusResponse, String)> = HashMap::new();
        let mut first_error = None;
        for (result, (url, _)) in by_endpoint.into_iter().zip(&self.endpoints) {
            match result {
                Some(Ok(s)) => {
                    let id = s.header.as_ref().map_or(0, |h| h.member_id);
                    statuses.entry(id).or_insert((s, url.clone()));
                }
                Some(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                None => {}
            }
        }

        let list = self.member_list().await;
        let members = match list {
            Ok(list) => list.members,
            Err(e) if statuses.is_empty() => {
                return Err(self.naming_endpoints(first_error.unwrap_or(e)));
            }
            // Someone answered Status but not MemberList: show who answered.
            Err(_) => Vec::new(),
        };
        let mut missing = Vec::new();
        for m in &members {
            if !statuses.contains_key(&m.id)
                && let Some(url) = m.client_ur_ls.first()
            {
                missing.push((m.id, url.clone()));
            }
        }
        let mut asks = JoinSet::new();
        let mut errors: HashMap<u64, String> = HashMap::new();
        for (id, url) in missing {
            match self.channel_for(&url) {
                Ok(channel) => {
                    let token = self.token.clone();
                    asks.spawn(async move { (id, url, status_of(channel, token).await) });
                }
                Err(e) => {
                    errors.insert(id, e);
                }
            }
        }
        while let Some(joined) = asks.join_next().await {
            match joined {
                Ok((id, url, Ok(s))) => {
                    statuses.insert(id, (s, url));
                }
                Ok((id, _, Err(e))) => {
                    errors.insert(id, e.to_string());
                }
                Err(_) => {}
            }
        }

        let mut out = Vec::new();
        let mut seen = Vec::new();
        for m in &members {
            seen.push(m.id);
            out.push(member_json(
                m.id,
                &m.name,
                &m.client_ur_ls,
                &m.peer_ur_ls,
                m.is_learner,
                statuses.get(&m.id),
                errors.get(&m.id).cloned().or_else(|| {
                    m.client_ur_ls
                        .is_empty()
                        .then(|| "the member advertises no client URL (not started yet?)".into())
                }),
            ));
        }
        // Members that answered Status but are not in the list we got (no list at all).
        for (id, status) in &statuses {
            if !seen.contains(id) {
                out.push(member_json(*id, "", &[], &[], false, Some(status), None));
            }
        }
        let leader = statuses.values().map(|(s, _)| s.leader).find(|l| *l != 0);
        let term = statuses.values().map(|(s, _)| s.raft_term).max();
        let revision = statuses
            .values()
            .filter_map(|(s, _)| s.header.as_ref().map(|h| h.revision))
            .max();
        let cluster_id = statuses
            .values()
            .find_map(|(s, _)| s.header.as_ref().map(|h| hex(h.cluster_id)));
        Ok(json!({
            "cluster_id": cluster_id,
            "leader": leader.map(hex),
            "term": term,
            "revision": revision,
            "members": out,
        }))
    }

    /// `e`, saying which endpoints were asked when none could be reached.
    fn naming_endpoints(&self, e: DashboardError) -> DashboardError {
        match e {
            DashboardError::Unreachable {
                source_name,
                message,
            } => {
                let asked: Vec<&str> = self.endpoints.iter().map(|(u, _)| u.as_str()).collect();
                DashboardError::Unreachable {
                    source_name,
                    message: format!("{message} (asked {})", asked.join(", ")),
                }
            }
            other => other,
        }
    }

    async fn member_list(&self) -> Result<etcd::MemberListResponse, DashboardError> {
        let mut last = DashboardError::NotConfigured("no coordinator endpoints".into());
        for (_, channel) in &self.endpoints {
            let channel = channel.clone();
            let token = self.token.clone();
            let answer = bounded(COORDINATOR, async move {
                ClusterClient::new(channel)
                    .member_list(with_token(
                        etcd::MemberListRequest::default(),
                        token.as_ref(),
                    ))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| from_status(COORDINATOR, &s))
            })
            .await;
            match answer {
                Ok(list) => return Ok(list),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

fn member_json(
    id: u64,
    name: &str,
    client_urls: &[String],
    peer_urls: &[String],
    is_learner: bool,
    status: Option<&(etcd::StatusResponse, String)>,
    error: Option<String>,
) -> Value {
    let Some((s, asked)) = status else {
        return json!({
            "id": hex(id),
            "name": name,
            "client_urls": client_urls,
            "peer_urls": peer_urls,
            "is_learner": is_learner,
            "leader": false,
            "health": "unreachable",
            "error": error.unwrap_or_else(|| "no answer".into()),
        });
    };
    // Healthy: it answers, knows a leader and raises no alarm.
    let health = if s.leader != 0 && s.errors.is_empty() {
        "healthy"
    } else {
        "unhealthy"
    };
    json!({
        "id": hex(id),
        "name": name,
        "client_urls": client_urls,
        "peer_urls": peer_urls,
        "is_learner": is_learner || s.is_learner,
        "leader": s.leader != 0 && s.leader == id,
        "health": health,
        "asked": asked,
        "version": s.version,
        "term": s.raft_term,
        "revision": s.header.as_ref().map_or(0, |h| h.revision),
        "raft_index": s.raft_index,
        "raft_applied_index": s.raft_applied_index,
        "db_size": s.db_size,
        "db_size_in_use": s.db_size_in_use,
        "errors": s.errors,
    })
}

// ---- registry -------------------------------------------------------------------------------

/// The registry's namespaces.
pub async fn namespaces(registry: &RegistryClient) -> Result<Vec<String>, DashboardError> {
    let mut grpc = registry.grpc();
    bounded(REGISTRY, async move {
        grpc.list_namespaces(pb::ListNamespacesRequest {})
            .await
            .map(|r| r.into_inner().namespaces)
            .map_err(|s| from_status(REGISTRY, &s))
    })
    .await
}

/// Every namespace, service and instance of the registry; `routed` names the gateway's routes
/// per `namespace/service`.
pub async fn services(
    registry: &RegistryClient,
    routed: &HashMap<String, Vec<String>>,
) -> Result<Value, DashboardError> {
    let namespaces = namespaces(registry).await?;
    let mut revision = 0i64;
    // (namespace, service) → instances.
    let mut found: BTreeMap<(String, String), Vec<pb::Instance>> = BTreeMap::new();
    let mut listed = JoinSet::new();
    for ns in namespaces {
        let mut grpc = registry.grpc();
        listed.spawn(bounded(REGISTRY, async move {
            let request = pb::ListServicesRequest {
                namespace: ns.clone(),
            };
            match grpc.list_services(request).await {
                Ok(r) => Ok((ns, r.into_inner())),
                Err(s) => Err(from_status(REGISTRY, &s)),
            }
        }));
    }
    let mut discovered = JoinSet::new();
    while let Some(joined) = listed.join_next().await {
        let Ok(answer) = joined else { continue };
        let (ns, list) = answer?;
        revision = revision.max(list.revision);
        for svc in list.services {
            found.insert((ns.clone(), svc.clone()), Vec::new());
            let (client, ns) = (registry.clone(), ns.clone());
            let request = pb::DiscoverRequest {
                namespace: ns.clone(),
                service: svc.clone(),
                healthy_only: false,
                ..Default::default()
            };
            discovered.spawn(bounded(REGISTRY, async move {
                client
                    .discover(request)
                    .await
                    .map(|r| (ns, svc, r))
                    .map_err(|s| from_status(REGISTRY, &s))
            }));
        }
    }
    while let Some(joined) = discovered.join_next().await {
        let Ok(answer) = joined else { continue };
        let (ns, svc, answer) = answer?;
        revision = revision.max(answer.revision);
        found.insert((ns, svc), answer.instances);
    }

    let mut by_ns: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for ((ns, svc), mut instances) in found {
        instances.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        let healthy = instances
            .iter()
            .filter(|i| i.health != pb::HealthStatus::Unhealthy as i32)
            .count();
        let total = instances.len();
        let instances: Vec<Value> = instances
            .into_iter()
            .filter_map(|i| registry_svc::grpc::instance_from_pb(i).ok())
            .filter_map(|i| serde_json::to_value(i).ok())
            .collect();
        let key = format!("{ns}/{svc}");
        by_ns.entry(ns).or_default().push(json!({
            "service": svc,
            "routes": routed.get(&key).cloned().unwrap_or_default(),
            "healthy": healthy,
            "total": total,
            "instances": instances,
        }));
    }
    let namespaces: Vec<Value> = by_ns
        .into_iter()
        .map(|(ns, services)| json!({ "namespace": ns, "services": services }))
        .collect();
    Ok(json!({ "revision": revision, "namespaces": namespaces }))
}

// ---- config-svc -----------------------------------------------------------------------------

/// Checks a config-svc base URL (`http://host:port` or `https://host:port`, no path) and
/// returns it without a trailing slash.
pub fn base_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .map_err(|e| format!("config-svc URL {url:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(format!(
            "config-svc URL {url:?} must look like http://host:port or https://host:port"
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("config-svc URL {url:?} must have no path or query"));
    }
    Ok(trimmed.to_owned())
}

/// A client of config-svc's REST API, moving to the next URL when one cannot be reached.
pub struct ConfigRest {
    urls: Vec<String>,
    current: AtomicUsize,
    client: Client<HttpsConnector, Empty<Bytes>>,
    /// `Bearer <token>` for config-svc's auth, when it is on.
    authorization: Option<http::HeaderValue>,
}

/// The message of a config-svc error body (`{"error": {"message": ...}}`), or its text.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect())
}

impl ConfigRest {
    /// A client of `urls` (checked with [`base_url`]; `https://` ones over `tls`, the
    /// gateway's `--client-*` files), sending `token` as a bearer token (empty: none).
    pub fn new(
        urls: Vec<String>,
        tls: Option<Arc<ClientConfig>>,
        token: &str,
    ) -> Result<ConfigRest, String> {
        let urls = urls
            .iter()
            .map(|u| base_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        if tls.is_none()
            && let Some(url) = urls.iter().find(|u| is_https(u))
        {
            return Err(format!(
                "config-svc URL {url:?} is https:// but no --client-cacert was given to check its certificate"
            ));
        }
        let authorization = if token.is_empty() {
            None
        } else {
            Some(
                http::HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| "the config-svc token is not a valid header value".to_owned())?,
            )
        };
        Ok(ConfigRest {
            urls,
            current: AtomicUsize::new(0),
            client: Client::builder(TokioExecutor::new())
                .build(HttpsConnector::new(tls, CONNECT_TIMEOUT)),
            authorization,
        })
    }

    /// GET `path_and_query` as JSON from the first URL that answers.
    async fn get(&self, path_and_query: &str) -> Result<Value, DashboardError> {
        let mut last = DashboardError::NotConfigured("no config-svc URL".into());
        for _ in 0..self.urls.len() {
            let i = self.current.load(Ordering::Relaxed) % self.urls.len();
            let url = format!("{}{path_and_query}", self.urls[i]);
            match bounded(CONFIG, self.get_once(&url)).await {
                Err(e @ (DashboardError::Unreachable { .. } | DashboardError::Timeout { .. })) => {
                    let _ = self.current.compare_exchange(
                        i,
                        i + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    last = e;
                }
                other => return other,
            }
        }
        Err(last)
    }

    async fn get_once(&self, url: &str) -> Result<Value, DashboardError> {
        let unreachable = |message: String| DashboardError::Unreachable {
            source_name: CONFIG,
            message,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| DashboardError::BadRequest(format!("bad config-svc URL {url:?}: {e}")))?;
        let mut request = http::Request::get(uri);
        if let Some(auth) = &self.authorization {
            request = request.header(http::header::AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| DashboardError::BadRequest(format!("config-svc request {url:?}: {e}")))?;
        let answer = self.client.request(request).await.map_err(|e| {
            // The innermost cause says it best (a refused connection, a certificate problem).
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                detail = inner.to_string();
                source = inner.source();
            }
            unreachable(format!("{url}: {detail}"))
        })?;
        let status = answer.status();
        let body = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(format!("{url}: reading the answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(DashboardError::Upstream {
                source_name: CONFIG,
                status,
                message: error_message(&body),
            });
        }
        serde_json::from_slice(&body)
            .map_err(|e| unreachable(format!("{url}: the answer is not JSON: {e}")))
    }

    /// One page of the items of namespace `ns`.
    pub async fn list_items(&self, ns: &str) -> Result<Value, DashboardError> {
        config_svc::model::validate_name("namespace", ns)
            .map_err(|e| DashboardError::BadRequest(e.to_string()))?;
        self.get(&format!("/v1/namespaces/{ns}/items?page_size={ITEMS_PAGE}"))
            .await
    }

    /// The newest versions of `item` (namespace, group, key; names already checked).
    pub async fn history(&self, item: &[String; 3]) -> Result<Value, DashboardError> {
        let [ns, group, key] = item;
        self.get(&format!(
            "/v1/namespaces/{ns}/groups/{group}/items/{key}/versions?page_size={HISTORY_PAGE}"
        ))
        .await
    }

    /// The diff of `item` from version `from` to `to` (0: config-svc's defaults).
    pub async fn diff(
        &self,
        item: &[String; 3],
        from: u64,
        to: u64,
    ) -> Result<Value, DashboardError> {
        let [ns, group, key] = item;
        let mut query: Vec<String> = Vec::new();
        if from != 0 {
            query.push(format!("from={from}"));
        }
        if to != 0 {
            query.push(format!("to={to}"));
        }
        self.get(&format!(
            "/v1/namespaces/{ns}/groups/{group}/items/{key}/diff?{}",
            query.join("&")
        ))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_urls_must_be_http_or_https_base_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:9301/").as_deref(),
            Ok("http://127.0.0.1:9301")
        );
        assert_eq!(
            base_url("https://config:9301").as_deref(),
            Ok("https://config:9301")
        );
        assert!(base_url("ftp://config:9301").is_err());
        assert!(base_url("config:9301").is_err());
        assert!(base_url("http://config:9301/v1").is_err());
        assert!(base_url("http://config:9301?x=1").is_err());
    }

    #[test]
    fn error_message_prefers_config_svcs_message() {
        assert_eq!(
            error_message(
                br#"{"error":{"code":"not_found","message":"item a/b/c does not exist"}}"#
            ),
            "item a/b/c does not exist"
        );
        assert_eq!(error_message(br#"{"error":"plain"}"#), "plain");
        assert_eq!(error_message(b"bad gateway"), "bad gateway");
    }
}
