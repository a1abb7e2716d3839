//! Routes overridden from config-svc.
//!
//! With `--config-endpoints` and `--routes-item namespace/group/key`, the gateway subscribes to
//! that config-svc item (through `config_svc::client`, which keeps the last good version and
//! resumes its watch across outages). Each version is a whole routes file in the same TOML
//! format; it replaces the routes the gateway serves, without a restart:
//!
//! - it is checked exactly as the file is; a version that fails is *rejected* (logged, counted
//!   in `lb_gateway_route_reloads_total{result="rejected"}`) and the current routes stay;
//! - a route that keeps its name and its backend (namespace, service, tags, zone) keeps its
//!   live backend set, loads and ejections across the swap; the others start empty and fill
//!   from their registry watch;
//! - requests in flight finish on the route they started on; new ones see the new table.
//!
//! The file given with `--routes` is what the gateway starts with and serves until the first
//! version arrives (and if config-svc never answers); deleting the item keeps the routes last
//! applied.

use config_svc::client::{Change, ConfigClient};
use config_svc::model::ItemRef;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A routes file's text and where it came from (for logs and the admin API).
#[derive(Debug, Clone)]
pub struct Update {
    /// TOML text.
    pub text: String,
    /// E.g. `config-svc prod/lb-gateway/routes.toml v7`.
    pub source: String,
}

/// Parses `namespace/group/key`.
pub fn parse_item(s: &str) -> Result<ItemRef, String> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [ns, group, key] if !ns.is_empty() && !group.is_empty() && !key.is_empty() => {
            Ok(ItemRef::new(*ns, *group, *key))
        }
        _ => Err(format!(
            "invalid routes item {s:?}: expected namespace/group/key, e.g. prod/lb-gateway/routes.toml"
        )),
    }
}

/// Subscribes to `item` on config-svc at `endpoints` (over TLS with `tls`) and sends every new version on `updates`
/// until `shutdown`.
pub fn spawn(
    endpoints: Vec<String>,
    token: &str,
    item: ItemRef,
    tls: Option<std::sync::Arc<service_kit::tls::rustls::ClientConfig>>,
    updates: mpsc::UnboundedSender<Update>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, String> {
    let client = ConfigClient::builder(endpoints)
        .tls(tls)
        .token(token)
        .build()
        .map_err(|s| format!("invalid config-svc endpoint or token: {}", s.message()))?;
    Ok(tokio::spawn(async move {
        let shown = item.to_string();
        let subscription = client.subscribe(vec![item], move |change: &Change| match change {
            Change::Updated { version, .. } => {
                let _ = updates.send(Update {
                    text: version.content.clone(),
                    source: format!("config-svc {shown} v{}", version.number),
                });
            }
            Change::Deleted { item } => {
                tracing::warn!(item = %item, "the routes item was deleted in config-svc; keeping the routes last applied");
            }
        });
        shutdown.cancelled().await;
        subscription.close().await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_three_non_empty_parts() {
        let i = parse_item("prod/lb-gateway/routes.toml").expect("valid");
        assert_eq!(i.key, "routes.toml");
        for bad in ["prod/lb-gateway", "a//b", "/a/b", "a/b/c/d", ""] {
            assert!(parse_item(bad).is_err(), "{bad}");
        }
    }
}
