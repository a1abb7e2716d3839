//! Registry commands: `services`, `instances`, `register`, `deregister`, `watch`, through
//! `registry_svc::client` (which moves to the next endpoint when one is unavailable).

use std::time::Duration;

use proto::registry_v1 as pb;
use registry_svc::client::RegistryClient;
use serde_json::{Value, json};

use crate::cli::{Output, Protocol, RegisterArgs};
use crate::error::{CtlError, Result};
use crate::output::{Table, emit, stream_line};
use crate::{Ctx, Done};

const SERVICE: &str = "registry-svc";

fn addr(ctx: &Ctx) -> String {
    ctx.global.registry.join(",")
}

fn client(ctx: &Ctx) -> Result<RegistryClient> {
    let client = RegistryClient::connect_tls(
        ctx.global.registry.iter().map(|e| e.trim().to_owned()),
        ctx.tls.clone(),
    )
    .map_err(|s| CtlError::Usage(format!("--registry: {}", s.message())))?;
    match &ctx.global.token {
        Some(token) => client
            .with_token(token)
            .map_err(|s| CtlError::Usage(format!("--token: {}", s.message()))),
        None => Ok(client),
    }
}

/// Runs a registry call under `--timeout`, mapping its status.
async fn call<T>(
    ctx: &Ctx,
    fut: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T> {
    let a = addr(ctx);
    ctx.bounded(SERVICE, &a, async {
        fut.await.map_err(|s| CtlError::from_status(SERVICE, &a, s))
    })
    .await
}

fn protocol_name(p: i32) -> &'static str {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Grpc) => "grpc",
        Ok(pb::Protocol::Tcp) => "tcp",
        Ok(pb::Protocol::Http) => "http",
        _ => "-",
    }
}

fn health_name(h: i32) -> &'static str {
    match pb::HealthStatus::try_from(h) {
        Ok(pb::HealthStatus::Healthy) => "healthy",
        Ok(pb::HealthStatus::Unhealthy) => "unhealthy",
        _ => "unknown",
    }
}

/// An instance as JSON (the proto's fields, enums by name).
pub fn instance_json(i: &pb::Instance) -> Value {
    json!({
        "namespace": i.namespace,
        "service": i.service,
        "instance_id": i.instance_id,
        "address": i.address,
        "port": i.port,
        "protocol": protocol_name(i.protocol),
        "metadata": i.metadata,
        "tags": i.tags,
        "weight": i.weight,
        "zone": i.zone,
        "ttl_seconds": i.ttl_seconds,
        "health": health_name(i.health),
        "health_detail": i.health_detail,
        "revision": i.revision,
    })
}

/// `services`.
pub async fn services(ctx: &Ctx) -> Result<Done> {
    let c = client(ctx)?;
    let ns = ctx.global.namespace.clone();
    let list = call(ctx, async {
        c.grpc()
            .list_services(pb::ListServicesRequest {
                namespace: ns.clone(),
            })
            .await
            .map(|r| r.into_inner())
    })
    .await?;
    let mut rows = Vec::new();
    for svc in &list.services {
        let found = call(
            ctx,
            c.discover(pb::DiscoverRequest {
                namespace: ns.clone(),
                service: svc.clone(),
                ..Default::default()
            }),
        )
        .await?;
        let healthy = found
            .instances
            .iter()
            .filter(|i| i.health == pb::HealthStatus::Healthy as i32)
            .count();
        rows.push((svc.clone(), found.instances.len(), healthy));
    }
    let json = json!({
        "namespace": ns,
        "revision": list.revision,
        "services": rows.iter().map(|(s, n, h)| json!({"service": s, "instances": n, "healthy": h})).collect::<Vec<_>>(),
    });
    emit(ctx.global.output, &json, || {
        let mut t = Table::new(&["SERVICE", "INSTANCES", "HEALTHY"]);
        for (s, n, h) in &rows {
            t.row(vec![s.clone(), n.to_string(), h.to_string()]);
        }
        if t.is_empty() {
            format!("no services in namespace {ns:?}")
        } else {
            t.to_string()
        }
    });
    Ok(Done::Ok)
}

fn instances_table(instances: &[pb::Instance]) -> Table {
    let mut t = Table::new(&[
        "INSTANCE", "ADDRESS", "PROTOCOL", "HEALTH", "ZONE", "WEIGHT", "TTL", "TAGS", "REVISION",
    ]);
    for i in instances {
        t.row(vec![
            i.instance_id.clone(),
            format!("{}:{}", i.address, i.port),
            protocol_name(i.protocol).into(),
            health_name(i.health).into(),
            if i.zone.is_empty() {
                "-".into()
            } else {
                i.zone.clone()
            },
            i.weight.to_string(),
            format!("{}s", i.ttl_seconds),
            if i.tags.is_empty() {
                "-".into()
            } else {
                i.tags.join(",")
            },
            i.revision.to_string(),
        ]);
    }
    t
}

/// `instances <service>`.
pub async fn instances(
    ctx: &Ctx,
    service: &str,
    healthy_only: bool,
    tags: Vec<String>,
    zone: Option<String>,
) -> Result<Done> {
    let c = client(ctx)?;
    let found = call(
        ctx,
        c.discover(pb::DiscoverRequest {
            namespace: ctx.global.namespace.clone(),
            service: service.to_owned(),
            tags,
            zone: zone.unwrap_or_default(),
            healthy_only,
            ..Default::default()
        }),
    )
    .await?;
    let json = json!({
        "namespace": ctx.global.namespace,
        "service": service,
        "revision": found.revision,
        "protect_threshold_triggered": found.protect_threshold_triggered,
        "instances": found.instances.iter().map(instance_json).collect::<Vec<_>>(),
    });
    emit(ctx.global.output, &json, || {
        if found.instances.is_empty() {
            return format!(
                "no instances of {}/{service} (revision {})",
                ctx.global.namespace, found.revision
            );
        }
        let mut text = instances_table(&found.instances).to_string();
        if found.protect_threshold_triggered {
            text.push_str("note: too few healthy instances (protect threshold): unhealthy ones are listed too\n");
        }
        text
    });
    Ok(Done::Ok)
}

/// `register <service> --address --port ...`.
pub async fn register(ctx: &Ctx, args: RegisterArgs) -> Result<Done> {
    let c = client(ctx)?;
    let instance = pb::Instance {
        namespace: ctx.global.namespace.clone(),
        service: args.service.clone(),
        instance_id: args.instance_id.unwrap_or_default(),
        address: args.address,
        port: u32::from(args.port),
        protocol: match args.protocol {
            Protocol::Http => pb::Protocol::Http,
            Protocol::Grpc => pb::Protocol::Grpc,
            Protocol::Tcp => pb::Protocol::Tcp,
        } as i32,
        metadata: args.metadata.into_iter().collect(),
        tags: args.tags,
        weight: args.weight.unwrap_or(0),
        zone: args.zone.unwrap_or_default(),
        ttl_seconds: args.ttl,
        ..Default::default()
    };
    let output = ctx.global.output;
    if !args.keep {
        let stored = call(ctx, c.register_once(instance)).await?;
        emit(output, &instance_json(&stored), || {
            format!(
                "registered {} of {}/{} at {}:{} (revision {}); it expires {} s after its last heartbeat (use --keep to heartbeat)",
                stored.instance_id,
                stored.namespace,
                stored.service,
                stored.address,
                stored.port,
                stored.revision,
                stored.ttl_seconds
            )
        });
        return Ok(Done::Ok);
    }
    let registration = call(ctx, c.register(instance)).await?;
    let stored = registration.instance();
    emit(output, &instance_json(&stored), || {
        format!(
            "registered {} of {}/{} at {}:{}; heart-beating until Ctrl-C",
            stored.instance_id, stored.namespace, stored.service, stored.address, stored.port
        )
    });
    wait_for_ctrl_c().await?;
    call(ctx, registration.deregister()).await?;
    if output == Output::Table {
        println!("deregistered {}", stored.instance_id);
    }
    Ok(Done::Ok)
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM.
pub async fn wait_for_ctrl_c() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| CtlError::Io {
            path: "signal handler".into(),
            source: e,
        })?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    Ok(())
}

/// `deregister <service> <id>`.
pub async fn deregister(ctx: &Ctx, service: &str, id: &str) -> Result<Done> {
    let c = client(ctx)?;
    let existed = call(
        ctx,
        c.deregister(pb::InstanceRef {
            namespace: ctx.global.namespace.clone(),
            service: service.to_owned(),
            instance_id: id.to_owned(),
        }),
    )
    .await?;
    if !existed {
        return Err(CtlError::Refused {
            service: SERVICE,
            code: "NOT_FOUND".into(),
            message: format!(
                "instance {id} of {}/{service} is not registered",
                ctx.global.namespace
            ),
        });
    }
    let json = json!({ "namespace": ctx.global.namespace, "service": service, "instance_id": id, "deregistered": true });
    emit(ctx.global.output, &json, || {
        format!("deregistered {id} of {}/{service}", ctx.global.namespace)
    });
    Ok(Done::Ok)
}

fn change_kind(k: i32) -> &'static str {
    match pb::ChangeKind::try_from(k) {
        Ok(pb::ChangeKind::Added) => "added",
        Ok(pb::ChangeKind::Modified) => "modified",
        Ok(pb::ChangeKind::Removed) => "removed",
        _ => "unknown",
    }
}

fn event_line(revision: i64, event: &str, i: &pb::Instance) -> String {
    format!(
        "{revision:<8} {event:<9} {}/{} {} {}:{} {}",
        i.namespace,
        i.service,
        i.instance_id,
        i.address,
        i.port,
        health_name(i.health)
    )
}

/// `watch <service>`: the current instances, then every change, resuming after the last
/// revision seen when the stream breaks.
pub async fn watch(ctx: &Ctx, service: &str, count: Option<u64>) -> Result<Done> {
    let c = client(ctx)?;
    let output = ctx.global.output;
    let mut seen = 0u64;
    let mut after = 0i64;
    let mut backoff = Duration::from_millis(200);
    if count == Some(0) {
        return Ok(Done::Ok);
    }
    loop {
        let req = pb::WatchRequest {
            namespace: ctx.global.namespace.clone(),
            service: service.to_owned(),
            after_revision: after,
        };
        // The first open must work; later ones (after a break) retry until Ctrl-C.
        let opened = if after == 0 {
            Some(call(ctx, c.watch(req)).await?)
        } else {
            tokio::select! {
                _ = wait_for_ctrl_c() => return Ok(Done::Ok),
                r = c.watch(req) => r.ok(),
            }
        };
        if let Some(mut stream) = opened {
            loop {
                let msg = tokio::select! {
                    _ = wait_for_ctrl_c() => return Ok(Done::Ok),
                    m = stream.message() => m,
                };
                let event = match msg {
                    Ok(Some(m)) => m.event,
                    Ok(None) => break,
                    Err(s) => {
                        eprintln!(
                            "platformctl: registry watch broke ({}); resuming",
                            s.message()
                        );
                        break;
                    }
                };
                match event {
                    Some(pb::watch_response::Event::Snapshot(snap)) => {
                        backoff = Duration::from_millis(200);
                        after = snap.revision;
                        let json = json!({
                            "event": "snapshot",
                            "revision": snap.revision,
                            "resynced": snap.resynced,
                            "instances": snap.instances.iter().map(instance_json).collect::<Vec<_>>(),
                        });
                        let mut line = format!(
                            "# {}/{service}: {} instance(s) at revision {}{}",
                            ctx.global.namespace,
                            snap.instances.len(),
                            snap.revision,
                            if snap.resynced { " (resynced)" } else { "" }
                        );
                        for i in &snap.instances {
                            line.push('\n');
                            line.push_str(&event_line(snap.revision, "present", i));
                        }
                        stream_line(output, &json, &line);
                    }
                    Some(pb::watch_response::Event::Change(ch)) => {
                        backoff = Duration::from_millis(200);
                        after = after.max(ch.revision);
                        let instance = ch.instance.unwrap_or_default();
                        let kind = change_kind(ch.kind);
                        let json = json!({
                            "event": kind,
                            "revision": ch.revision,
                            "instance": instance_json(&instance),
                        });
                        stream_line(output, &json, &event_line(ch.revision, kind, &instance));
                        seen += 1;
                        if count.is_some_and(|n| seen >= n) {
                            return Ok(Done::Ok);
                        }
                    }
                    None => {}
                }
            }
        }
        tokio::select! {
            _ = wait_for_ctrl_c() => return Ok(Done::Ok),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
