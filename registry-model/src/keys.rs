//! The registry's key layout in the coordinator — the one place it is written down.
//!
//! | key | value | lease |
//! |---|---|---|
//! | `/registry/v1/instances/<ns>/<svc>/<instance-id>` | [`Instance`](crate::model::Instance) as JSON | the instance's own lease (TTL = `ttl_seconds`) |
//! | `/registry/v1/services/<ns>/<svc>` | [`ServiceOptions`](crate::model::ServiceOptions) as JSON; created by the first registration | none: outlives its instances |
//! | `/registry/v1/replicas/<replica-id>` | a live registry-svc replica (for sharding health checks) | the replica's lease |
//!
//! Names cannot contain `/` (see `model::validate_name`), so a prefix never matches a longer
//! name by accident: `/registry/v1/instances/prod/orders/` holds the instances of `orders` only.
//! The namespaces are the first parts of the `services/` keys: a namespace exists once a
//! service in it was registered.

/// Everything the registry stores.
pub const ROOT: &str = "/registry/v1/";
/// Instance records.
pub const INSTANCES: &str = "/registry/v1/instances/";
/// Service records.
pub const SERVICES: &str = "/registry/v1/services/";
/// Live replicas.
pub const REPLICAS: &str = "/registry/v1/replicas/";

/// The key of one instance.
pub fn instance(ns: &str, svc: &str, id: &str) -> String {
    format!("{INSTANCES}{ns}/{svc}/{id}")
}

/// The prefix of a service's instances.
pub fn service_instances(ns: &str, svc: &str) -> String {
    format!("{INSTANCES}{ns}/{svc}/")
}

/// The prefix of every instance in a namespace.
pub fn namespace_instances(ns: &str) -> String {
    format!("{INSTANCES}{ns}/")
}

/// The key of a service record.
pub fn service(ns: &str, svc: &str) -> String {
    format!("{SERVICES}{ns}/{svc}")
}

/// The prefix of a namespace's service records.
pub fn namespace_services(ns: &str) -> String {
    format!("{SERVICES}{ns}/")
}

/// The key of a replica.
pub fn replica(id: &str) -> String {
    format!("{REPLICAS}{id}")
}

/// `(ns, svc, id)` of an instance key.
pub fn parse_instance(key: &[u8]) -> Option<(String, String, String)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(INSTANCES)?;
    let mut parts = rest.splitn(3, '/');
    let (ns, svc, id) = (parts.next()?, parts.next()?, parts.next()?);
    Some((ns.to_owned(), svc.to_owned(), id.to_owned()))
}

/// `(ns, svc)` of a service key.
pub fn parse_service(key: &[u8]) -> Option<(String, String)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(SERVICES)?;
    let (ns, svc) = rest.split_once('/')?;
    Some((ns.to_owned(), svc.to_owned()))
}

/// The replica ID of a replica key.
pub fn parse_replica(key: &[u8]) -> Option<String> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(REPLICAS)?;
    Some(rest.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = instance("prod", "orders", "10.0.0.1:80");
        assert_eq!(k, "/registry/v1/instances/prod/orders/10.0.0.1:80");
        assert_eq!(
            parse_instance(k.as_bytes()),
            Some(("prod".into(), "orders".into(), "10.0.0.1:80".into()))
        );
        assert!(k.starts_with(&service_instances("prod", "orders")));
        assert!(!k.starts_with(&service_instances("prod", "order")));
        assert_eq!(
            parse_service(service("a", "b").as_bytes()),
            Some(("a".into(), "b".into()))
        );
        assert_eq!(parse_replica(replica("r1").as_bytes()), Some("r1".into()));
        assert_eq!(parse_instance(b"/other"), None);
    }
}
