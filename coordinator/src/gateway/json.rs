//! The proto3 JSON mapping of the etcd messages the gateway carries, as etcd's grpc-gateway
//! reads and writes them.
//!
//! Output follows what etcd emits: fields under their names in `rpc.proto` (`create_revision`,
//! `grantedTTL`, `peerURLs`), in field order, defaults left out, `bytes` as standard base64,
//! 64-bit integers as decimal strings, enums by name, a set `oneof` member always written.
//! Input accepts what protojson accepts: the proto name or its lowerCamelCase JSON name
//! (`range_end` or `rangeEnd`), integers as numbers or strings, enums by name or number,
//! `null` for a default; unknown fields are ignored (as etcd's gateway does). Anything else is
//! a [`DecodeError`] that the gateway answers with 400 and gRPC code 3.

use base64::Engine as _;
use proto::etcdserverpb as pb;
use proto::mvccpb;
use serde_json::{Map, Value};

/// A request body that does not fit the message it is meant for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

type DResult<T> = Result<T, DecodeError>;

fn err<T>(msg: impl Into<String>) -> DResult<T> {
    Err(DecodeError(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// The lowerCamelCase JSON name protoc derives from a field name.
fn json_name(proto: &str) -> String {
    let mut out = String::with_capacity(proto.len());
    let mut upper = false;
    for c in proto.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// One JSON object read as a message of type `msg` (named in errors).
struct In<'a> {
    map: Option<&'a Map<String, Value>>,
    msg: &'static str,
}

impl<'a> In<'a> {
    fn new(v: &'a Value, msg: &'static str) -> DResult<In<'a>> {
        match v {
            Value::Object(m) => Ok(In { map: Some(m), msg }),
            Value::Null => Ok(In { map: None, msg }),
            other => err(format!(
                "cannot read {} from JSON: an object expected, got {}",
                msg,
                kind(other)
            )),
        }
    }

    /// The value of a field under its proto name or its JSON name; `null` counts as absent.
    fn get(&self, proto: &str) -> Option<&'a Value> {
        let m = self.map?;
        let v = m.get(proto).or_else(|| m.get(&json_name(proto)))?;
        (!v.is_null()).then_some(v)
    }

    fn bad(&self, field: &str, what: &str, v: &Value) -> DecodeError {
        DecodeError(format!(
            "bad value for field {:?} of {}: {} expected, got {}",
            field,
            self.msg,
            what,
            kind(v)
        ))
    }

    fn bytes(&self, f: &str) -> DResult<Vec<u8>> {
        match self.get(f) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => decode_base64(s).map_err(|e| {
                DecodeError(format!(
                    "bad value for field {:?} of {}: {}",
                    f, self.msg, e
                ))
            }),
            Some(v) => Err(self.bad(f, "a base64 string", v)),
        }
    }

    fn string(&self, f: &str) -> DResult<String> {
        match self.get(f) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.bad(f, "a string", v)),
        }
    }

    fn boolean(&self, f: &str) -> DResult<bool> {
        match self.get(f) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(f, "true or false", v)),
        }
    }

    fn i64(&self, f: &str) -> DResult<i64> {
        match self.get(f) {
            None => Ok(0),
            Some(v) => int_value(v).ok_or_else(|| self.bad(f, "a 64-bit integer", v)),
        }
    }

    /// An enum field: its value's name (from `names`, indexed by number) or its number.
    fn enumeration(&self, f: &str, enum_name: &str, names: &[&str]) -> DResult<i32> {
        match self.get(f) {
            None => Ok(0),
            Some(v) => enum_value(v, enum_name, names),
        }
    }

    fn repeated(&self, f: &str) -> DResult<&'a [Value]> {
        match self.get(f) {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a.as_slice()),
            Some(v) => Err(self.bad(f, "an array", v)),
        }
    }
}

fn enum_value(v: &Value, enum_name: &str, names: &[&str]) -> DResult<i32> {
    match v {
        Value::String(s) => match names.iter().position(|n| n == s) {
            Some(i) => Ok(i as i32),
            None => err(format!("unknown value {s:?} for enum {enum_name}")),
        },
        other => match int_value(other).and_then(|i| i32::try_from(i).ok()) {
            Some(i) => Ok(i),
            None => err(format!(
                "bad value for enum {enum_name}: a name or a number expected, got {}",
                kind(other)
            )),
        },
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn int_value(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            // protojson accepts a float with no fractional part (1e3).
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Standard base64 as etcd's clients send it; URL-safe and unpadded forms are accepted too
/// (protojson accepts both).
pub fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim_end_matches('=');
    if s.contains(['-', '_']) {
        URL_SAFE_NO_PAD
            .decode(s)
            .or_else(|_| URL_SAFE.decode(s))
            .map_err(|e| format!("illegal base64 data: {e}"))
    } else {
        STANDARD_NO_PAD
            .decode(s)
            .or_else(|_| STANDARD.decode(s))
            .map_err(|e| format!("illegal base64 data: {e}"))
    }
}

const SORT_ORDER: &[&str] = &["NONE", "ASCEND", "DESCEND"];
const SORT_TARGET: &[&str] = &["KEY", "VERSION", "CREATE", "MOD", "VALUE"];
const COMPARE_RESULT: &[&str] = &["EQUAL", "GREATER", "LESS", "NOT_EQUAL"];
const COMPARE_TARGET: &[&str] = &["VERSION", "CREATE", "MOD", "VALUE", "LEASE"];
const FILTER_TYPE: &[&str] = &["NOPUT", "NODELETE"];
const EVENT_TYPE: &[&str] = &["PUT", "DELETE"];

/// `etcdserverpb.RangeRequest`.
pub fn range_request(v: &Value) -> DResult<pb::RangeRequest> {
    let o = In::new(v, "etcdserverpb.RangeRequest")?;
    Ok(pb::RangeRequest {
        key: o.bytes("key")?,
        range_end: o.bytes("range_end")?,
        limit: o.i64("limit")?,
        revision: o.i64("revision")?,
        sort_order: o.enumeration(
            "sort_order",
            "etcdserverpb.RangeRequest_SortOrder",
            SORT_ORDER,
        )?,
        sort_target: o.enumeration(
            "sort_target",
            "etcdserverpb.RangeRequest_SortTarget",
            SORT_TARGET,
        )?,
        serializable: o.boolean("serializable")?,
        keys_only: o.boolean("keys_only")?,
        count_only: o.boolean("count_only")?,
        min_mod_revision: o.i64("min_mod_revision")?,
        max_mod_revision: o.i64("max_mod_revision")?,
        min_create_revision: o.i64("min_create_revision")?,
        max_create_revision: o.i64("max_create_revision")?,
    })
}

/// `etcdserverpb.PutRequest`.
pub fn put_request(v: &Value) -> DResult<pb::PutRequest> {
    let o = In::new(v, "etcdserverpb.PutRequest")?;
    Ok(pb::PutRequest {
        key: o.bytes("key")?,
        value: o.bytes("value")?,
        lease: o.i64("lease")?,
        prev_kv: o.boolean("prev_kv")?,
        ignore_value: o.boolean("ignore_value")?,
        ignore_lease: o.boolean("ignore_lease")?,
    })
}

/// `etcdserverpb.DeleteRangeRequest`.
pub fn delete_range_request(v: &Value) -> DResult<pb::DeleteRangeRequest> {
    let o = In::new(v, "etcdserverpb.DeleteRangeRequest")?;
    Ok(pb::DeleteRangeRequest {
        key: o.bytes("key")?,
        range_end: o.bytes("range_end")?,
        prev_kv: o.boolean("prev_kv")?,
    })
}

/// How deep txns may nest in a JSON body (as deep as a proposal may nest; this also keeps a
/// hostile body from exhausting the stack).
const MAX_TXN_DEPTH: usize = crate::command::MAX_NESTING;

/// `etcdserverpb.TxnRequest`.
pub fn txn_request(v: &Value) -> DResult<pb::TxnRequest> {
    txn_at(v, 0)
}

fn txn_at(v: &Value, depth: usize) -> DResult<pb::TxnRequest> {
    if depth > MAX_TXN_DEPTH {
        return err("txn requests nested too deeply");
    }
    let o = In::new(v, "etcdserverpb.TxnRequest")?;
    let compare = o
        .repeated("compare")?
        .iter()
        .map(compare)
        .collect::<DResult<_>>()?;
    let success = o
        .repeated("success")?
        .iter()
        .map(|v| request_op(v, depth))
        .collect::<DResult<_>>()?;
    let failure = o
        .repeated("failure")?
        .iter()
        .map(|v| request_op(v, depth))
        .collect::<DResult<_>>()?;
    Ok(pb::TxnRequest {
        compare,
        success,
        failure,
    })
}

fn compare(v: &Value) -> DResult<pb::Compare> {
    use pb::compare::TargetUnion as U;
    let o = In::new(v, "etcdserverpb.Compare")?;
    let mut set = Vec::new();
    if o.get("version").is_some() {
        set.push(U::Version(o.i64("version")?));
    }
    if o.get("create_revision").is_some() {
        set.push(U::CreateRevision(o.i64("create_revision")?));
    }
    if o.get("mod_revision").is_some() {
        set.push(U::ModRevision(o.i64("mod_revision")?));
    }
    if o.get("value").is_some() {
        set.push(U::Value(o.bytes("value")?));
    }
    if o.get("lease").is_some() {
        set.push(U::Lease(o.i64("lease")?));
    }
    if set.len() > 1 {
        return err(
            "etcdserverpb.Compare: more than one of version, create_revision, mod_revision, value, lease is set",
        );
    }
    Ok(pb::Compare {
        result: o.enumeration(
            "result",
            "etcdserverpb.Compare_CompareResult",
            COMPARE_RESULT,
        )?,
        target: o.enumeration(
            "target",
            "etcdserverpb.Compare_CompareTarget",
            COMPARE_TARGET,
        )?,
        key: o.bytes("key")?,
        target_union: set.pop(),
        range_end: o.bytes("range_end")?,
    })
}

fn request_op(v: &Value, depth: usize) -> DResult<pb::RequestOp> {
    use pb::request_op::Request as R;
    let o = In::new(v, "etcdserverpb.RequestOp")?;
    let mut set = Vec::new();
    if let Some(v) = o.get("request_range") {
        set.push(R::RequestRange(range_request(v)?));
    }
    if let Some(v) = o.get("request_put") {
        set.push(R::RequestPut(put_request(v)?));
    }
    if let Some(v) = o.get("request_delete_range") {
        set.push(R::RequestDeleteRange(delete_range_request(v)?));
    }
    if let Some(v) = o.get("request_txn") {
        set.push(R::RequestTxn(txn_at(v, depth + 1)?));
    }
    if set.len() > 1 {
        return err("etcdserverpb.RequestOp: more than one request is set");
    }
    Ok(pb::RequestOp { request: set.pop() })
}

/// `etcdserverpb.CompactionRequest`.
pub fn compaction_request(v: &Value) -> DResult<pb::CompactionRequest> {
    let o = In::new(v, "etcdserverpb.CompactionRequest")?;
    Ok(pb::CompactionRequest {
        revision: o.i64("revision")?,
        physical: o.boolean("physical")?,
    })
}

/// `etcdserverpb.WatchRequest`.
pub fn watch_request(v: &Value) -> DResult<pb::WatchRequest> {
    use pb::watch_request::RequestUnion as U;
    let o = In::new(v, "etcdserverpb.WatchRequest")?;
    let mut set = Vec::new();
    if let Some(v) = o.get("create_request") {
        let c = In::new(v, "etcdserverpb.WatchCreateRequest")?;
        let filters = c
            .repeated("filters")?
            .iter()
            .map(|f| enum_value(f, "etcdserverpb.WatchCreateRequest_FilterType", FILTER_TYPE))
            .collect::<DResult<_>>()?;
        set.push(U::CreateRequest(pb::WatchCreateRequest {
            key: c.bytes("key")?,
            range_end: c.bytes("range_end")?,
            start_revision: c.i64("start_revision")?,
            progress_notify: c.boolean("progress_notify")?,
            filters,
            prev_kv: c.boolean("prev_kv")?,
            watch_id: c.i64("watch_id")?,
            fragment: c.boolean("fragment")?,
        }));
    }
    if let Some(v) = o.get("cancel_request") {
        let c = In::new(v, "etcdserverpb.WatchCancelRequest")?;
        set.push(U::CancelRequest(pb::WatchCancelRequest {
            watch_id: c.i64("watch_id")?,
        }));
    }
    if let Some(v) = o.get("progress_request") {
        In::new(v, "etcdserverpb.WatchProgressRequest")?;
        set.push(U::ProgressRequest(pb::WatchProgressRequest {}));
    }
    if set.len() > 1 {
        return err("etcdserverpb.WatchRequest: more than one request is set");
    }
    Ok(pb::WatchRequest {
        request_union: set.pop(),
    })
}

/// `etcdserverpb.LeaseGrantRequest`.
pub fn lease_grant_request(v: &Value) -> DResult<pb::LeaseGrantRequest> {
    let o = In::new(v, "etcdserverpb.LeaseGrantRequest")?;
    Ok(pb::LeaseGrantRequest {
        ttl: o.i64("TTL")?,
        id: o.i64("ID")?,
    })
}

/// `etcdserverpb.LeaseRevokeRequest`.
pub fn lease_revoke_request(v: &Value) -> DResult<pb::LeaseRevokeRequest> {
    let o = In::new(v, "etcdserverpb.LeaseRevokeRequest")?;
    Ok(pb::LeaseRevokeRequest { id: o.i64("ID")? })
}

/// `etcdserverpb.LeaseKeepAliveRequest`.
pub fn lease_keep_alive_request(v: &Value) -> DResult<pb::LeaseKeepAliveRequest> {
    let o = In::new(v, "etcdserverpb.LeaseKeepAliveRequest")?;
    Ok(pb::LeaseKeepAliveRequest { id: o.i64("ID")? })
}

/// `etcdserverpb.LeaseTimeToLiveRequest`.
pub fn lease_time_to_live_request(v: &Value) -> DResult<pb::LeaseTimeToLiveRequest> {
    let o = In::new(v, "etcdserverpb.LeaseTimeToLiveRequest")?;
    Ok(pb::LeaseTimeToLiveRequest {
        id: o.i64("ID")?,
        keys: o.boolean("keys")?,
    })
}

/// `etcdserverpb.LeaseLeasesRequest` (no fields; the body must still be an object).
pub fn lease_leases_request(v: &Value) -> DResult<pb::LeaseLeasesRequest> {
    In::new(v, "etcdserverpb.LeaseLeasesRequest")?;
    Ok(pb::LeaseLeasesRequest {})
}

/// `etcdserverpb.StatusRequest`.
pub fn status_request(v: &Value) -> DResult<pb::StatusRequest> {
    In::new(v, "etcdserverpb.StatusRequest")?;
    Ok(pb::StatusRequest {})
}

/// `etcdserverpb.MemberListRequest`.
pub fn member_list_request(v: &Value) -> DResult<pb::MemberListRequest> {
    let o = In::new(v, "etcdserverpb.MemberListRequest")?;
    Ok(pb::MemberListRequest {
        linearizable: o.boolean("linearizable")?,
    })
}

/// `etcdserverpb.AuthenticateRequest`.
pub fn authenticate_request(v: &Value) -> DResult<pb::AuthenticateRequest> {
    let o = In::new(v, "etcdserverpb.AuthenticateRequest")?;
    Ok(pb::AuthenticateRequest {
        name: o.string("name")?,
        password: o.string("password")?,
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Writes one JSON object field by field, leaving defaults out.
struct Out {
    buf: String,
    empty: bool,
}

impl Out {
    fn new() -> Out {
        Out {
            buf: String::from("{"),
            empty: true,
        }
    }

    fn name(&mut self, name: &str) {
        if !self.empty {
            self.buf.push(',');
        }
        self.empty = false;
        self.buf.push('"');
        self.buf.push_str(name);
        self.buf.push_str("\":");
    }

    /// A 64-bit integer, as protojson writes it: a decimal string.
    fn int(&mut self, name: &str, v: impl std::fmt::Display + PartialEq + Default) -> &mut Out {
        if v != Default::default() {
            self.name(name);
            self.buf.push('"');
            self.buf.push_str(&v.to_string());
            self.buf.push('"');
        }
        self
    }

    fn boolean(&mut self, name: &str, v: bool) -> &mut Out {
        if v {
            self.name(name);
            self.buf.push_str("true");
        }
        self
    }

    fn string(&mut self, name: &str, v: &str) -> &mut Out {
        if !v.is_empty() {
            self.name(name);
            self.buf.push_str(&quote(v));
        }
        self
    }

    fn bytes(&mut self, name: &str, v: &[u8]) -> &mut Out {
        if !v.is_empty() {
            self.name(name);
            self.buf.push('"');
            self.buf
                .push_str(&base64::engine::general_purpose::STANDARD.encode(v));
            self.buf.push('"');
        }
        self
    }

    fn enumeration(&mut self, name: &str, v: i32, names: &[&str]) -> &mut Out {
        if v != 0 {
            self.name(name);
            match usize::try_from(v).ok().and_then(|i| names.get(i)) {
                Some(n) => self.buf.push_str(&quote(n)),
                // An unknown number is written as a number, as protojson does.
                None => self.buf.push_str(&v.to_string()),
            }
        }
        self
    }

    /// An embedded message (left out when absent).
    fn msg(&mut self, name: &str, v: Option<String>) -> &mut Out {
        if let Some(v) = v {
            self.name(name);
            self.buf.push_str(&v);
        }
        self
    }

    /// A repeated field of already encoded elements (left out when empty).
    fn list(&mut self, name: &str, items: impl IntoIterator<Item = String>) -> &mut Out {
        let mut it = items.into_iter().peekable();
        if it.peek().is_some() {
            self.name(name);
            self.buf.push('[');
            for (i, item) in it.enumerate() {
                if i > 0 {
                    self.buf.push(',');
                }
                self.buf.push_str(&item);
            }
            self.buf.push(']');
        }
        self
    }

    fn done(&mut self) -> String {
        let mut s = std::mem::take(&mut self.buf);
        s.push('}');
        s
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

fn b64(v: &[u8]) -> String {
    format!(
        "\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(v)
    )
}

/// `etcdserverpb.ResponseHeader`.
pub fn header(h: &Option<pb::ResponseHeader>) -> Option<String> {
    h.as_ref().map(|h| {
        Out::new()
            .int("cluster_id", h.cluster_id)
            .int("member_id", h.member_id)
            .int("revision", h.revision)
            .int("raft_term", h.raft_term)
            .done()
    })
}

/// `mvccpb.KeyValue`.
pub fn key_value(kv: &mvccpb::KeyValue) -> String {
    Out::new()
        .bytes("key", &kv.key)
        .int("create_revision", kv.create_revision)
        .int("mod_revision", kv.mod_revision)
        .int("version", kv.version)
        .bytes("value", &kv.value)
        .int("lease", kv.lease)
        .done()
}

fn opt_kv(kv: &Option<mvccpb::KeyValue>) -> Option<String> {
    kv.as_ref().map(key_value)
}

/// `etcdserverpb.RangeResponse`.
pub fn range_response(r: &pb::RangeResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .list("kvs", r.kvs.iter().map(key_value))
        .boolean("more", r.more)
        .int("count", r.count)
        .done()
}

/// `etcdserverpb.PutResponse`.
pub fn put_response(r: &pb::PutResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .msg("prev_kv", opt_kv(&r.prev_kv))
        .done()
}

/// `etcdserverpb.DeleteRangeResponse`.
pub fn delete_range_response(r: &pb::DeleteRangeResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .int("deleted", r.deleted)
        .list("prev_kvs", r.prev_kvs.iter().map(key_value))
        .done()
}

/// `etcdserverpb.TxnResponse`.
pub fn txn_response(r: &pb::TxnResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .boolean("succeeded", r.succeeded)
        .list("responses", r.responses.iter().map(response_op))
        .done()
}

fn response_op(r: &pb::ResponseOp) -> String {
    use pb::response_op::Response as R;
    let mut o = Out::new();
    // A set oneof member is written even when it holds only defaults.
    match &r.response {
        Some(R::ResponseRange(x)) => o.msg("response_range", Some(range_response(x))),
        Some(R::ResponsePut(x)) => o.msg("response_put", Some(put_response(x))),
        Some(R::ResponseDeleteRange(x)) => {
            o.msg("response_delete_range", Some(delete_range_response(x)))
        }
        Some(R::ResponseTxn(x)) => o.msg("response_txn", Some(txn_response(x))),
        None => &mut o,
    };
    o.done()
}

/// `etcdserverpb.CompactionResponse`.
pub fn compaction_response(r: &pb::CompactionResponse) -> String {
    Out::new().msg("header", header(&r.header)).done()
}

/// `mvccpb.Event`.
pub fn event(e: &mvccpb::Event) -> String {
    Out::new()
        .enumeration("type", e.r#type, EVENT_TYPE)
        .msg("kv", opt_kv(&e.kv))
        .msg("prev_kv", opt_kv(&e.prev_kv))
        .done()
}

/// `etcdserverpb.WatchResponse`.
pub fn watch_response(r: &pb::WatchResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .int("watch_id", r.watch_id)
        .boolean("created", r.created)
        .boolean("canceled", r.canceled)
        .int("compact_revision", r.compact_revision)
        .string("cancel_reason", &r.cancel_reason)
        .boolean("fragment", r.fragment)
        .list("events", r.events.iter().map(event))
        .done()
}

/// `etcdserverpb.LeaseGrantResponse`.
pub fn lease_grant_response(r: &pb::LeaseGrantResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .int("ID", r.id)
        .int("TTL", r.ttl)
        .string("error", &r.error)
        .done()
}

/// `etcdserverpb.LeaseRevokeResponse`.
pub fn lease_revoke_response(r: &pb::LeaseRevokeResponse) -> String {
    Out::new().msg("header", header(&r.header)).done()
}

/// `etcdserverpb.LeaseKeepAliveResponse`.
pub fn lease_keep_alive_response(r: &pb::LeaseKeepAliveResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .int("ID", r.id)
        .int("TTL", r.ttl)
        .done()
}

/// `etcdserverpb.LeaseTimeToLiveResponse`.
pub fn lease_time_to_live_response(r: &pb::LeaseTimeToLiveResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .int("ID", r.id)
        .int("TTL", r.ttl)
        .int("grantedTTL", r.granted_ttl)
        .list("keys", r.keys.iter().map(|k| b64(k)))
        .done()
}

/// `etcdserverpb.LeaseLeasesResponse`.
pub fn lease_leases_response(r: &pb::LeaseLeasesResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .list(
            "leases",
            r.leases.iter().map(|l| Out::new().int("ID", l.id).done()),
        )
        .done()
}

/// `etcdserverpb.StatusResponse`.
pub fn status_response(r: &pb::StatusResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .string("version", &r.version)
        .int("dbSize", r.db_size)
        .int("leader", r.leader)
        .int("raftIndex", r.raft_index)
        .int("raftTerm", r.raft_term)
        .int("raftAppliedIndex", r.raft_applied_index)
        .list("errors", r.errors.iter().map(|e| quote(e)))
        .int("dbSizeInUse", r.db_size_in_use)
        .boolean("isLearner", r.is_learner)
        .done()
}

fn member(m: &pb::Member) -> String {
    Out::new()
        .int("ID", m.id)
        .string("name", &m.name)
        .list("peerURLs", m.peer_ur_ls.iter().map(|u| quote(u)))
        .list("clientURLs", m.client_ur_ls.iter().map(|u| quote(u)))
        .boolean("isLearner", m.is_learner)
        .done()
}

/// `etcdserverpb.MemberListResponse`.
pub fn member_list_response(r: &pb::MemberListResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .list("members", r.members.iter().map(member))
        .done()
}

/// `etcdserverpb.AuthenticateResponse`.
pub fn authenticate_response(r: &pb::AuthenticateResponse) -> String {
    Out::new()
        .msg("header", header(&r.header))
        .string("token", &r.token)
        .done()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn range_request_reads_proto_and_json_names() {
        let r = range_request(&json!({
            "key": "Zm9v", "rangeEnd": "Zm9w", "limit": "5", "revision": 7,
            "sort_order": "DESCEND", "sortTarget": 3, "keys_only": true, "bogus": 1
        }))
        .expect("decodes");
        assert_eq!(r.key, b"foo");
        assert_eq!(r.range_end, b"fop");
        assert_eq!((r.limit, r.revision), (5, 7));
        assert_eq!((r.sort_order, r.sort_target), (2, 3));
        assert!(r.keys_only && !r.count_only);
    }

    #[test]
    fn bad_fields_are_named() {
        let e = range_request(&json!({"key": 5})).expect_err("refused");
        assert!(e.0.contains("\"key\""), "{e}");
        let e = range_request(&json!({"key": "!!!"})).expect_err("refused");
        assert!(e.0.contains("base64"), "{e}");
        let e = range_request(&json!({"key": "Zm9v", "sort_order": "BAD"})).expect_err("refused");
        assert_eq!(
            e.0,
            "unknown value \"BAD\" for enum etcdserverpb.RangeRequest_SortOrder"
        );
        let e = range_request(&json!({"key": "Zm9v", "limit": "abc"})).expect_err("refused");
        assert!(e.0.contains("\"limit\""), "{e}");
        assert!(range_request(&json!([1])).is_err());
        assert!(range_request(&json!(null)).is_ok());
    }

    #[test]
    fn txn_oneofs_and_nesting() {
        let t = txn_request(&json!({
            "compare": [{"target": "CREATE", "key": "Zm9v", "createRevision": "0"}],
            "success": [{"requestPut": {"key": "Zm9v", "value": "YmFy"}},
                        {"request_txn": {"success": [{"request_range": {"key": "Zm9v"}}]}}],
            "failure": [{"request_delete_range": {"key": "Zm9v"}}]
        }))
        .expect("decodes");
        assert_eq!(
            t.compare[0].target_union,
            Some(pb::compare::TargetUnion::CreateRevision(0))
        );
        assert_eq!(t.compare[0].target, 1);
        assert_eq!(t.success.len(), 2);
        assert!(matches!(
            t.success[1].request,
            Some(pb::request_op::Request::RequestTxn(_))
        ));
        let mut deep = json!({});
        for _ in 0..100 {
            deep = json!({"success": [{"request_txn": deep}]});
        }
        assert!(txn_request(&deep).is_err());
    }

    #[test]
    fn output_matches_etcd_gateway() {
        let r = pb::RangeResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: 12585971608760269493,
                member_id: 1,
                revision: 2,
                raft_term: 3,
            }),
            kvs: vec![mvccpb::KeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                value: b"bar".to_vec(),
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        assert_eq!(
            range_response(&r),
            r#"{"header":{"cluster_id":"12585971608760269493","member_id":"1","revision":"2","raft_term":"3"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#
        );
        let e = mvccpb::Event {
            r#type: 1,
            kv: Some(mvccpb::KeyValue {
                key: b"foo".to_vec(),
                mod_revision: 5,
                ..Default::default()
            }),
            prev_kv: None,
        };
        assert_eq!(
            event(&e),
            r#"{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"5"}}"#
        );
        let t = pb::TxnResponse {
            header: None,
            succeeded: true,
            responses: vec![pb::ResponseOp {
                response: Some(pb::response_op::Response::ResponsePut(pb::PutResponse {
                    header: None,
                    prev_kv: None,
                })),
            }],
        };
        assert_eq!(
            txn_response(&t),
            r#"{"succeeded":true,"responses":[{"response_put":{}}]}"#
        );
    }

    #[test]
    fn base64_forms() {
        assert_eq!(decode_base64("Zm9vYg==").expect("std"), b"foob");
        assert_eq!(decode_base64("Zm9vYg").expect("unpadded"), b"foob");
        assert_eq!(decode_base64("-_8").expect("url-safe"), vec![0xfb, 0xff]);
        assert!(decode_base64("Zm9v*").is_err());
    }
}
