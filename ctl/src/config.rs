//! Configuration commands (`config ...`), through `config_svc::client` and its gRPC client.

use std::io::Read as _;
use std::time::Duration;

use config_svc::client::ConfigClient;
use proto::config_v1 as pb;
use serde_json::{Value, json};

use crate::cli::{ConfigCommand, Item, PublishArgs, RolloutCommand};
use crate::error::{CtlError, Result};
use crate::output::{Table, bytes, emit, short_checksum, stream_line, time_ms};
use crate::registry::wait_for_ctrl_c;
use crate::{Ctx, Done};

const SERVICE: &str = "config-svc";

fn addr(ctx: &Ctx) -> String {
    ctx.global.config.join(",")
}

fn client(ctx: &Ctx) -> Result<ConfigClient> {
    ConfigClient::builder(ctx.global.config.iter().map(|e| e.trim().to_owned()))
        .timeout(ctx.global.timeout)
        .token(ctx.global.token.clone().unwrap_or_default())
        .tls(ctx.tls.clone())
        .build()
        .map_err(|s| CtlError::Usage(format!("--config or --token: {}", s.message())))
}

/// Runs one unary call on the client's current endpoint under `--timeout`.
async fn call<T>(
    ctx: &Ctx,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    let a = addr(ctx);
    ctx.bounded(SERVICE, &a, async {
        fut.await
            .map(tonic::Response::into_inner)
            .map_err(|s| CtlError::from_status(SERVICE, &a, s))
    })
    .await
}

fn item_ref(ctx: &Ctx, item: &Item) -> pb::ItemRef {
    pb::ItemRef {
        namespace: ctx.global.namespace.clone(),
        group: item.group.clone(),
        key: item.key.clone(),
    }
}

fn path_of(r: Option<&pb::ItemRef>) -> String {
    r.map(|r| format!("{}/{}/{}", r.namespace, r.group, r.key))
        .unwrap_or_default()
}

fn format_name(f: i32) -> &'static str {
    match pb::Format::try_from(f) {
        Ok(pb::Format::Text) => "text",
        Ok(pb::Format::Json) => "json",
        Ok(pb::Format::Yaml) => "yaml",
        Ok(pb::Format::Toml) => "toml",
        Ok(pb::Format::Properties) => "properties",
        _ => "-",
    }
}

fn parse_format(name: &str) -> Result<pb::Format> {
    let f: config_svc::model::Format = name.parse().map_err(|_| {
        CtlError::Usage(format!(
            "format {name:?} is not one of json, yaml, toml, properties, text"
        ))
    })?;
    Ok(match f {
        config_svc::model::Format::Text => pb::Format::Text,
        config_svc::model::Format::Json => pb::Format::Json,
        config_svc::model::Format::Yaml => pb::Format::Yaml,
        config_svc::model::Format::Toml => pb::Format::Toml,
        config_svc::model::Format::Properties => pb::Format::Properties,
    })
}

fn reason_name(r: i32) -> &'static str {
    match pb::Reason::try_from(r) {
        Ok(pb::Reason::Initial) => "initial",
        Ok(pb::Reason::Missed) => "missed",
        Ok(pb::Reason::Published) => "published",
        Ok(pb::Reason::RolledBack) => "rolled-back",
        Ok(pb::Reason::Rollout) => "rollout",
        Ok(pb::Reason::Promoted) => "promoted",
        Ok(pb::Reason::Aborted) => "aborted",
        _ => "unknown",
    }
}

/// A version as JSON (content included when present).
fn version_json(v: &pb::Version) -> Value {
    json!({
        "item": path_of(v.item.as_ref()),
        "number": v.number,
        "format": format_name(v.format),
        "content": v.content,
        "checksum": v.checksum,
        "size": v.size,
        "author": v.author,
        "message": v.message,
        "created_at_ms": v.created_at_ms,
        "created_at": time_ms(v.created_at_ms),
        "rollback_of": v.rollback_of,
        "candidate": v.candidate,
    })
}

fn rollout_json(r: &pb::Rollout) -> Value {
    let rule = r.rule.clone().unwrap_or_default();
    json!({
        "candidate": r.candidate,
        "base": r.base,
        "labels": rule.labels,
        "percentage": rule.percentage,
        "author": r.author,
        "started_at_ms": r.started_at_ms,
        "started_at": time_ms(r.started_at_ms),
    })
}

/// An item's state as JSON.
fn item_json(i: &pb::Item) -> Value {
    json!({
        "item": path_of(i.item.as_ref()),
        "format": format_name(i.format),
        "current_version": i.current_version,
        "latest_version": i.latest_version,
        "deleted": i.deleted,
        "schema": i.schema,
        "retention": i.retention,
        "rollout": i.rollout.as_ref().map(rollout_json),
        "aborted": i.aborted,
        "created_at_ms": i.created_at_ms,
        "updated_at_ms": i.updated_at_ms,
    })
}

fn rule_text(r: &pb::Rollout) -> String {
    let rule = r.rule.clone().unwrap_or_default();
    let mut parts: Vec<String> = rule
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.sort();
    if let Some(p) = rule.percentage {
        parts.push(format!("{p}% of client ids"));
    }
    if parts.is_empty() {
        "every client".into()
    } else {
        parts.join(" and ")
    }
}

/// Dispatches `config ...`.
pub async fn run(ctx: &Ctx, cmd: ConfigCommand) -> Result<Done> {
    let c = client(ctx)?;
    match cmd {
        ConfigCommand::Get {
            item,
            version,
            content_only,
        } => get(ctx, &c, &item, version.unwrap_or(0), content_only).await,
        ConfigCommand::Put { item, publish } => {
            let answer = publish_version(ctx, &c, &item, publish, None).await?;
            print_published(ctx, &answer, "published");
            Ok(Done::Ok)
        }
        ConfigCommand::List { group } => list(ctx, &c, group).await,
        ConfigCommand::History { item } => history(ctx, &c, &item).await,
        ConfigCommand::Diff { item, from, to } => diff(ctx, &c, &item, from, to.unwrap_or(0)).await,
        ConfigCommand::Rollback {
            item,
            version,
            message,
        } => {
            let answer = call(
                ctx,
                c.grpc().rollback(pb::RollbackRequest {
                    item: Some(item_ref(ctx, &item)),
                    version,
                    author: author(None),
                    message,
                    expected_version: None,
                }),
            )
            .await?;
            print_published(ctx, &answer, "rolled back");
            Ok(Done::Ok)
        }
        ConfigCommand::Watch {
            items,
            group,
            count,
        } => watch(ctx, &c, items, group, count).await,
        ConfigCommand::Rollout(r) => rollout(ctx, &c, r).await,
    }
}

async fn get(
    ctx: &Ctx,
    c: &ConfigClient,
    item: &Item,
    version: u64,
    content_only: bool,
) -> Result<Done> {
    let answer = call(
        ctx,
        c.grpc().get(pb::GetRequest {
            item: Some(item_ref(ctx, item)),
            version,
            client: None,
        }),
    )
    .await?;
    let v = answer.version.unwrap_or_default();
    let state = answer.item.unwrap_or_default();
    let json = json!({ "version": version_json(&v), "item": item_json(&state) });
    emit(ctx.global.output, &json, || {
        if content_only {
            return v.content.clone();
        }
        let mut t = Table::new(&["FIELD", "VALUE"]);
        t.row(vec!["item".into(), path_of(v.item.as_ref())]);
        t.row(vec![
            "version".into(),
            format!(
                "{} (current {}, latest {})",
                v.number, state.current_version, state.latest_version
            ),
        ]);
        t.row(vec!["format".into(), format_name(v.format).into()]);
        t.row(vec!["size".into(), bytes(v.size)]);
        t.row(vec!["checksum".into(), v.checksum.clone()]);
        t.row(vec!["author".into(), v.author.clone()]);
        t.row(vec!["created".into(), time_ms(v.created_at_ms)]);
        if !v.message.is_empty() {
            t.row(vec!["message".into(), v.message.clone()]);
        }
        if v.rollback_of != 0 {
            t.row(vec![
                "rollback of".into(),
                format!("version {}", v.rollback_of),
            ]);
        }
        if let Some(r) = &state.rollout {
            t.row(vec![
                "rollout".into(),
                format!("candidate {} for {}", r.candidate, rule_text(r)),
            ]);
        }
        format!("{t}\n{}", v.content)
    });
    Ok(Done::Ok)
}

fn author(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "platformctl".into())
}

fn read_content(publish: &PublishArgs) -> Result<String> {
    if let Some(text) = &publish.content.content {
        return Ok(text.clone());
    }
    let Some(path) = &publish.content.file else {
        return Err(CtlError::Usage("give --file or --content".into()));
    };
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CtlError::Io {
                path: "standard input".into(),
                source: e,
            })?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| CtlError::Io {
        path: path.display().to_string(),
        source: e,
    })
}

/// The format from `--format`, else from the key's (or the file's) extension if it names one,
/// else unspecified (the item keeps its own).
fn format_for(item: &Item, publish: &PublishArgs) -> Result<pb::Format> {
    if let Some(f) = &publish.format {
        return parse_format(f);
    }
    let ext_of = |name: &str| name.rsplit_once('.').map(|(_, e)| e.to_owned());
    let candidates = [
        ext_of(&item.key),
        publish
            .content
            .file
            .as_ref()
            .and_then(|p| p.to_str())
            .and_then(ext_of),
    ];
    Ok(candidates
        .into_iter()
        .flatten()
        .find_map(|e| parse_format(&e).ok())
        .unwrap_or(pb::Format::Unspecified))
}

async fn publish_version(
    ctx: &Ctx,
    c: &ConfigClient,
    item: &Item,
    publish: PublishArgs,
    rollout: Option<pb::RolloutRule>,
) -> Result<pb::PublishResponse> {
    let content = read_content(&publish)?;
    let format = format_for(item, &publish)?;
    call(
        ctx,
        c.grpc().publish(pb::PublishRequest {
            item: Some(item_ref(ctx, item)),
            format: format as i32,
            content,
            author: author(publish.author),
            message: publish.message,
            expected_version: publish.expected_version,
            schema: None,
            retention: None,
            rollout,
        }),
    )
    .await
}

fn print_published(ctx: &Ctx, answer: &pb::PublishResponse, what: &str) {
    let v = answer.version.clone().unwrap_or_default();
    let state = answer.item.clone().unwrap_or_default();
    let json = json!({
        "version": version_json(&v),
        "item": item_json(&state),
        "revision": answer.revision,
    });
    emit(ctx.global.output, &json, || {
        let mut line = format!(
            "{what} {} version {} ({}, {}, {})",
            path_of(v.item.as_ref()),
            v.number,
            format_name(v.format),
            bytes(v.size),
            short_checksum(&v.checksum)
        );
        if v.rollback_of != 0 {
            line.push_str(&format!("; content of version {}", v.rollback_of));
        }
        if v.candidate
            && let Some(r) = &state.rollout
        {
            line.push_str(&format!(
                "; rollout candidate for {} (others keep version {})",
                rule_text(r),
                r.base
            ));
        }
        line
    });
}

async fn list(ctx: &Ctx, c: &ConfigClient, group: Option<String>) -> Result<Done> {
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let page = call(
            ctx,
            c.grpc().list(pb::ListRequest {
                namespace: ctx.global.namespace.clone(),
                group: group.clone().unwrap_or_default(),
                include_deleted: false,
                page_size: 100,
                page_token: token.clone(),
            }),
        )
        .await?;
        items.extend(page.items);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let json = json!({ "namespace": ctx.global.namespace, "items": items.iter().map(item_json).collect::<Vec<_>>() });
    emit(ctx.global.output, &json, || {
        if items.is_empty() {
            return format!("no items in namespace {:?}", ctx.global.namespace);
        }
        let mut t = Table::new(&["ITEM", "FORMAT", "CURRENT", "LATEST", "UPDATED", "ROLLOUT"]);
        for i in &items {
            let r = i.item.clone().unwrap_or_default();
            t.row(vec![
                format!("{}/{}", r.group, r.key),
                format_name(i.format).into(),
                i.current_version.to_string(),
                i.latest_version.to_string(),
                time_ms(i.updated_at_ms),
                i.rollout
                    .as_ref()
                    .map(|r| format!("candidate {}", r.candidate))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        t.to_string()
    });
    Ok(Done::Ok)
}

async fn history(ctx: &Ctx, c: &ConfigClient, item: &Item) -> Result<Done> {
    let mut versions = Vec::new();
    let mut token = String::new();
    loop {
        let page = call(
            ctx,
            c.grpc().history(pb::HistoryRequest {
                item: Some(item_ref(ctx, item)),
                page_size: 100,
                page_token: token.clone(),
                include_content: false,
            }),
        )
        .await?;
        versions.extend(page.versions);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    // Which one is current (a deleted item has none; that is not an error here).
    let current = call(
        ctx,
        c.grpc().get(pb::GetRequest {
            item: Some(item_ref(ctx, item)),
            version: 0,
            client: None,
        }),
    )
    .await
    .ok()
    .and_then(|g| g.item)
    .map(|i| i.current_version)
    .unwrap_or(0);
    let json = json!({
        "item": path_of(Some(&item_ref(ctx, item))),
        "current_version": current,
        "versions": versions.iter().map(version_json).collect::<Vec<_>>(),
    });
    emit(ctx.global.output, &json, || {
        let mut t = Table::new(&[
            "VERSION", "CREATED", "AUTHOR", "SIZE", "CHECKSUM", "NOTE", "MESSAGE",
        ]);
        for v in &versions {
            let mut note = Vec::new();
            if v.number == current {
                note.push("current".to_owned());
            }
            if v.rollback_of != 0 {
                note.push(format!("rollback of {}", v.rollback_of));
            }
            if v.candidate {
                note.push("candidate".to_owned());
            }
            t.row(vec![
                v.number.to_string(),
                time_ms(v.created_at_ms),
                v.author.clone(),
                bytes(v.size),
                short_checksum(&v.checksum),
                if note.is_empty() {
                    "-".into()
                } else {
                    note.join(", ")
                },
                v.message.clone(),
            ]);
        }
        t.to_string()
    });
    Ok(Done::Ok)
}

fn key_op(op: i32) -> &'static str {
    match pb::key_change::Op::try_from(op) {
        Ok(pb::key_change::Op::Added) => "added",
        Ok(pb::key_change::Op::Removed) => "removed",
        Ok(pb::key_change::Op::Changed) => "changed",
        _ => "-",
    }
}

async fn diff(ctx: &Ctx, c: &ConfigClient, item: &Item, from: u64, to: u64) -> Result<Done> {
    let d = call(
        ctx,
        c.grpc().diff(pb::DiffRequest {
            item: Some(item_ref(ctx, item)),
            from_version: from,
            to_version: to,
        }),
    )
    .await?;
    let json = json!({
        "item": path_of(Some(&item_ref(ctx, item))),
        "from_version": d.from_version,
        "to_version": d.to_version,
        "unified": d.unified,
        "structured": d.structured,
        "changes": d.changes.iter().map(|k| json!({
            "path": k.path, "op": key_op(k.op), "old_value": k.old_value, "new_value": k.new_value,
        })).collect::<Vec<_>>(),
    });
    emit(ctx.global.output, &json, || {
        let mut text = d.unified.clone();
        if text.is_empty() {
            text = format!(
                "versions {} and {} have the same content\n",
                d.from_version, d.to_version
            );
        }
        if d.structured && !d.changes.is_empty() {
            let mut t = Table::new(&["KEY", "CHANGE", "OLD", "NEW"]);
            for k in &d.changes {
                t.row(vec![
                    k.path.clone(),
                    key_op(k.op).into(),
                    k.old_value.clone(),
                    k.new_value.clone(),
                ]);
            }
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push('\n');
            text.push_str(&t.to_string());
        }
        text
    });
    Ok(Done::Ok)
}

async fn watch(
    ctx: &Ctx,
    c: &ConfigClient,
    items: Vec<Item>,
    group: Option<String>,
    count: Option<u64>,
) -> Result<Done> {
    if count == Some(0) {
        return Ok(Done::Ok);
    }
    let output = ctx.global.output;
    let items: Vec<pb::ItemRef> = items.iter().map(|i| item_ref(ctx, i)).collect();
    let prefix = items.is_empty().then(|| pb::Prefix {
        namespace: ctx.global.namespace.clone(),
        group: group.unwrap_or_default(),
    });
    // Versions held, so a reconnect is sent only what it missed.
    let mut known: std::collections::HashMap<String, (pb::ItemRef, u64)> = Default::default();
    let mut seen = 0u64;
    let mut first = true;
    let mut backoff = Duration::from_millis(200);
    loop {
        let req = pb::WatchRequest {
            items: items.clone(),
            prefix: prefix.clone(),
            known: known
                .values()
                .map(|(r, v)| pb::KnownVersion {
                    item: Some(r.clone()),
                    version: *v,
                })
                .collect(),
            client: None,
        };
        let mut grpc = c.grpc();
        let opened = if first {
            first = false;
            Some(call(ctx, grpc.watch(req)).await?)
        } else {
            tokio::select! {
                _ = wait_for_ctrl_c() => return Ok(Done::Ok),
                r = grpc.watch(req) => r.ok().map(tonic::Response::into_inner),
            }
        };
        let mut synced = false;
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
                            "platformctl: config watch broke ({}); resuming",
                            s.message()
                        );
                        break;
                    }
                };
                match event {
                    Some(pb::watch_response::Event::Synced(s)) => {
                        backoff = Duration::from_millis(200);
                        synced = true;
                        let json = json!({ "event": "synced", "revision": s.revision });
                        stream_line(
                            output,
                            &json,
                            &format!("# synced at revision {}; watching", s.revision),
                        );
                    }
                    Some(pb::watch_response::Event::Update(u)) => {
                        let v = u.version.unwrap_or_default();
                        let path = path_of(v.item.as_ref());
                        if let Some(r) = &v.item {
                            known.insert(path.clone(), (r.clone(), v.number));
                        }
                        let reason = reason_name(u.reason);
                        let mut json = version_json(&v);
                        json["event"] = json!("update");
                        json["reason"] = json!(reason);
                        let line = format!(
                            "{reason:<11} {path} version {} ({}, {}, {})",
                            v.number,
                            format_name(v.format),
                            bytes(v.size),
                            short_checksum(&v.checksum)
                        );
                        stream_line(output, &json, &line);
                        if synced {
                            seen += 1;
                        }
                    }
                    Some(pb::watch_response::Event::Deleted(d)) => {
                        let path = path_of(d.item.as_ref());
                        known.remove(&path);
                        let json = json!({ "event": "deleted", "item": path });
                        stream_line(output, &json, &format!("{:<11} {path}", "deleted"));
                        if synced {
                            seen += 1;
                        }
                    }
                    None => {}
                }
                if count.is_some_and(|n| seen >= n) {
                    return Ok(Done::Ok);
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

async fn rollout(ctx: &Ctx, c: &ConfigClient, cmd: RolloutCommand) -> Result<Done> {
    let state = match cmd {
        RolloutCommand::Show { item } => {
            call(
                ctx,
                c.grpc().get(pb::GetRequest {
                    item: Some(item_ref(ctx, &item)),
                    version: 0,
                    client: None,
                }),
            )
            .await?
            .item
        }
        RolloutCommand::Start {
            item,
            publish,
            percentage,
            labels,
        } => {
            let rule = pb::RolloutRule {
                labels: labels.into_iter().collect(),
                percentage,
            };
            let answer = publish_version(ctx, c, &item, publish, Some(rule)).await?;
            print_published(ctx, &answer, "started rollout of");
            return Ok(Done::Ok);
        }
        RolloutCommand::Promote { item } => Some(
            call(
                ctx,
                c.grpc().promote(pb::PromoteRequest {
                    item: Some(item_ref(ctx, &item)),
                    author: author(None),
                }),
            )
            .await?,
        ),
        RolloutCommand::Abort { item } => Some(
            call(
                ctx,
                c.grpc().abort(pb::AbortRequest {
                    item: Some(item_ref(ctx, &item)),
                    author: author(None),
                }),
            )
            .await?,
        ),
    };
    let state = state.unwrap_or_default();
    let json = item_json(&state);
    emit(ctx.global.output, &json, || {
        let path = path_of(state.item.as_ref());
        let mut text = match &state.rollout {
            Some(r) => format!(
                "{path}: rollout of version {} to {} (others keep version {}), started by {} at {}",
                r.candidate,
                rule_text(r),
                r.base,
                r.author,
                time_ms(r.started_at_ms)
            ),
            None => format!(
                "{path}: no rollout in progress; current version {}",
                state.current_version
            ),
        };
        if !state.aborted.is_empty() {
            let list: Vec<String> = state.aborted.iter().map(u64::to_string).collect();
            text.push_str(&format!("\naborted candidates: {}", list.join(", ")));
        }
        text
    });
    Ok(Done::Ok)
}
