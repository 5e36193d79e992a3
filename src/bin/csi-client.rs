//! `csi-client`: calls one CSI v1.9.0 RPC on a driver's Unix socket, request and reply as JSON.
//!
//! For the demo, the image check and `kubectl exec` troubleshooting, where neither csc nor
//! grpcurl is at hand. Requests are built and replies printed through rust-protobuf reflection,
//! so a new RPC costs one line in the table and no conversion code.

use std::io::Read;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use grpcio::{CallOption, ChannelBuilder, Client, EnvBuilder, Method, RpcStatus};
use protobuf::reflect::{
    EnumDescriptor, FieldDescriptor, MessageDescriptor, ReflectFieldRef, ReflectValueBox, ReflectValueRef,
    RuntimeFieldType, RuntimeType,
};
use protobuf::{MessageDyn, MessageFull};
use serde_json::{json, Map, Value};

use node_local_cache::config::parse_duration;
use node_local_cache::proto::grpc;
use node_local_cache::server::socket_path;

node_local_cache::grpc_core_configuration!(client);

const EXAMPLES: &str = r#"Examples:
  csi-client --socket unix:///csi/csi.sock Probe
  csi-client NodeGetInfo
  csi-client CreateVolume --json '{"name":"pvc-1","volume_capabilities":[{"mount":{},"access_mode":{"mode":"MULTI_NODE_MULTI_WRITER"}}]}'
  echo '{"volume_id":"nlc-...","volume_path":"/var/lib/kubelet/pods/..."}' | csi-client NodeGetVolumeStats --json -

JSON uses proto field names (snake_case); enums by name or number; 64-bit integers as numbers or
strings; google.protobuf wrappers (BoolValue, Int64Value) as bare values. The reply is printed as
JSON on stdout. A failed call prints {"code":"NOT_FOUND","message":"..."} and exits 1; bad usage
exits 2. Run without a method to list them all."#;

struct Flags {
    socket: String,
    timeout: Duration,
    wait: bool,
    json: String,
    method: Option<String>,
}

fn command() -> Command {
    Command::new("csi-client")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Call one CSI RPC on a driver's socket and print the reply as JSON")
        .after_help(EXAMPLES)
        .args([
            Arg::new("socket")
                .long("socket")
                .value_name("SOCKET")
                .env("CSI_ENDPOINT")
                .default_value("/csi/csi.sock")
                .help("The driver's CSI socket: a path or unix:///path"),
            Arg::new("timeout")
                .long("timeout")
                .value_name("TIMEOUT")
                .default_value("30s")
                .value_parser(parse_duration)
                .help("Deadline for the call (ms, s, m or h)"),
            Arg::new("wait")
                .long("wait")
                .action(ArgAction::SetTrue)
                .help("Wait (up to --timeout) for the socket to accept connections instead of failing at once"),
            Arg::new("json")
                .long("json")
                .value_name("JSON")
                .default_value("{}")
                .help("The request as JSON, or \"-\" to read it from stdin; omitted fields keep their defaults"),
            Arg::new("method")
                .value_name("METHOD")
                .value_parser(value_parser!(String))
                .help("The RPC to call, e.g. Probe, NodeGetInfo, CreateVolume (case does not matter)"),
        ])
}

impl Flags {
    fn from_matches(m: &ArgMatches) -> Flags {
        let text = |id: &str| m.get_one::<String>(id).cloned().unwrap_or_default();
        Flags {
            socket: text("socket"),
            timeout: m.get_one::<Duration>("timeout").copied().unwrap_or_default(),
            wait: m.get_flag("wait"),
            json: text("json"),
            method: m.get_one::<String>("method").cloned(),
        }
    }
}

/// Why a run did not print a reply; each kind has its own exit code.
#[derive(Debug)]
enum Failure {
    /// The command line or the request JSON is wrong: exit 2, nothing was sent.
    Usage(String),
    /// The driver (or gRPC on its behalf, e.g. UNAVAILABLE) answered with a status: exit 1.
    Status { code: String, message: String },
    /// grpcio failed before any status existed: exit 1.
    Client(String),
}

impl From<grpcio::Error> for Failure {
    fn from(e: grpcio::Error) -> Failure {
        match e {
            grpcio::Error::RpcFailure(s) => Failure::Status {
                code: status_name(&s),
                message: s.message().to_owned(),
            },
            other => Failure::Client(other.to_string()),
        }
    }
}

/// gRPC's canonical name, so scripts can match on "NOT_FOUND" rather than on grpcio's Debug text.
fn status_name(s: &RpcStatus) -> String {
    node_local_cache::metrics::code_name(s.code())
        .map_or_else(|| format!("CODE_{}", i32::from(s.code())), str::to_owned)
}

// ---- the RPC table ----

type Invoke = fn(&Client, &dyn MessageDyn, CallOption) -> Result<Box<dyn MessageDyn>, Failure>;

/// One callable RPC: its gRPC path, the request type to build from JSON, and the typed call.
struct Rpc {
    /// e.g. "/csi.v1.Identity/Probe".
    path: &'static str,
    request: MessageDescriptor,
    invoke: Invoke,
}

impl Rpc {
    fn name(&self) -> &'static str {
        self.path.rsplit('/').next().unwrap_or(self.path)
    }
}

fn request_descriptor<Req: MessageFull, Resp>(_: &Method<Req, Resp>) -> MessageDescriptor {
    Req::descriptor()
}

fn invoke<Req: MessageFull, Resp: MessageFull + Unpin>(
    client: &Client,
    method: &Method<Req, Resp>,
    req: &dyn MessageDyn,
    opt: CallOption,
) -> Result<Box<dyn MessageDyn>, Failure> {
    let req = req
        .downcast_ref::<Req>()
        .ok_or_else(|| Failure::Client(format!("{}: request built with the wrong type", method.name)))?;
    let reply = client.unary_call(method, req, opt)?;
    Ok(Box::new(reply))
}

/// Names and request types come from the generated `METHOD_*` constants themselves, so the
/// table cannot disagree with the glue; the tests check it covers every RPC in csi.proto.
macro_rules! rpc_table {
    ($($method:ident),* $(,)?) => {
        vec![$(Rpc {
            path: grpc::$method.name,
            request: request_descriptor(&grpc::$method),
            invoke: |client, req, opt| invoke(client, &grpc::$method, req, opt),
        }),*]
    };
}

fn rpcs() -> Vec<Rpc> {
    rpc_table![
        METHOD_IDENTITY_GET_PLUGIN_INFO,
        METHOD_IDENTITY_GET_PLUGIN_CAPABILITIES,
        METHOD_IDENTITY_PROBE,
        METHOD_CONTROLLER_CREATE_VOLUME,
        METHOD_CONTROLLER_DELETE_VOLUME,
        METHOD_CONTROLLER_CONTROLLER_PUBLISH_VOLUME,
        METHOD_CONTROLLER_CONTROLLER_UNPUBLISH_VOLUME,
        METHOD_CONTROLLER_VALIDATE_VOLUME_CAPABILITIES,
        METHOD_CONTROLLER_LIST_VOLUMES,
        METHOD_CONTROLLER_GET_CAPACITY,
        METHOD_CONTROLLER_CONTROLLER_GET_CAPABILITIES,
        METHOD_CONTROLLER_CREATE_SNAPSHOT,
        METHOD_CONTROLLER_DELETE_SNAPSHOT,
        METHOD_CONTROLLER_LIST_SNAPSHOTS,
        METHOD_CONTROLLER_CONTROLLER_EXPAND_VOLUME,
        METHOD_CONTROLLER_CONTROLLER_GET_VOLUME,
        METHOD_CONTROLLER_CONTROLLER_MODIFY_VOLUME,
        METHOD_GROUP_CONTROLLER_GROUP_CONTROLLER_GET_CAPABILITIES,
        METHOD_GROUP_CONTROLLER_CREATE_VOLUME_GROUP_SNAPSHOT,
        METHOD_GROUP_CONTROLLER_DELETE_VOLUME_GROUP_SNAPSHOT,
        METHOD_GROUP_CONTROLLER_GET_VOLUME_GROUP_SNAPSHOT,
        METHOD_NODE_NODE_STAGE_VOLUME,
        METHOD_NODE_NODE_UNSTAGE_VOLUME,
        METHOD_NODE_NODE_PUBLISH_VOLUME,
        METHOD_NODE_NODE_UNPUBLISH_VOLUME,
        METHOD_NODE_NODE_GET_VOLUME_STATS,
        METHOD_NODE_NODE_EXPAND_VOLUME,
        METHOD_NODE_NODE_GET_CAPABILITIES,
        METHOD_NODE_NODE_GET_INFO,
    ]
}

fn method_list(rpcs: &[Rpc]) -> String {
    let mut services: Vec<(&str, Vec<&str>)> = Vec::new();
    for rpc in rpcs {
        let service = rpc.path.trim_start_matches('/').split('/').next().unwrap_or("");
        let service = service.rsplit('.').next().unwrap_or(service);
        match services.iter_mut().find(|(s, _)| *s == service) {
            Some((_, names)) => names.push(rpc.name()),
            None => services.push((service, vec![rpc.name()])),
        }
    }
    services
        .iter()
        .map(|(s, names)| format!("  {s}: {}", names.join(", ")))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---- running one call ----

fn main() -> ExitCode {
    let flags = Flags::from_matches(&command().get_matches());
    match run(&flags) {
        Ok(reply) => {
            println!("{}", pretty(&reply));
            ExitCode::SUCCESS
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("csi-client: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Status { code, message }) => {
            println!("{}", pretty(&json!({ "code": code, "message": message })));
            ExitCode::FAILURE
        }
        Err(Failure::Client(msg)) => {
            eprintln!("csi-client: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(flags: &Flags) -> Result<Value, Failure> {
    let table = rpcs();
    let Some(wanted) = flags.method.as_deref() else {
        return Err(Failure::Usage(format!(
            "which RPC? one of:\n{}\n(--help for examples)",
            method_list(&table)
        )));
    };
    let rpc = table
        .iter()
        .find(|r| r.name().eq_ignore_ascii_case(wanted))
        .ok_or_else(|| Failure::Usage(format!("no RPC {wanted:?}; one of:\n{}", method_list(&table))))?;

    let text = if flags.json == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::Usage(format!("--json -: reading stdin: {e}")))?;
        s
    } else {
        flags.json.clone()
    };
    let json: Value = serde_json::from_str(&text).map_err(|e| Failure::Usage(format!("--json: {e}")))?;
    let mut req = rpc.request.new_instance();
    fill_message(&mut *req, &json, "").map_err(|e| Failure::Usage(format!("--json for {}: {e}", rpc.name())))?;

    // One completion queue: a single blocking call needs no more threads.
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("csi-client").build());
    let target = format!("unix:{}", socket_path(&flags.socket).display());
    let client = Client::new(ChannelBuilder::new(env).connect(&target));
    let opt = CallOption::default().timeout(flags.timeout).wait_for_ready(flags.wait);
    let reply = (rpc.invoke)(&client, &*req, opt)?;
    Ok(message_to_json(&*reply))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

// ---- JSON to protobuf ----

/// Wrapper messages are written as their bare `value`, as the proto3 JSON mapping does: CSI
/// uses BoolValue for Probe's `ready` and Int64Value for capacities, and `"ready": true` reads
/// better than `"ready": {"value": true}` (which is accepted too).
const WRAPPERS: [&str; 9] = [
    "google.protobuf.BoolValue",
    "google.protobuf.BytesValue",
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int32Value",
    "google.protobuf.Int64Value",
    "google.protobuf.StringValue",
    "google.protobuf.UInt32Value",
    "google.protobuf.UInt64Value",
];

fn wrapped_field(d: &MessageDescriptor) -> Option<FieldDescriptor> {
    if WRAPPERS.contains(&d.full_name()) {
        d.field_by_name("value")
    } else {
        None
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// The path for error messages; the request itself has none.
fn shown(path: &str) -> &str {
    if path.is_empty() {
        "request"
    } else {
        path
    }
}

fn want(path: &str, what: &str, got: &Value) -> String {
    let mut got = got.to_string();
    if got.len() > 60 {
        got = format!("{}...", got.chars().take(57).collect::<String>());
    }
    format!("{}: want {what}, got {got}", shown(path))
}

/// Sets the fields of `msg` named by the keys of a JSON object. `path` locates `msg` in the
/// request, so every error names the exact field.
fn fill_message(msg: &mut dyn MessageDyn, json: &Value, path: &str) -> Result<(), String> {
    let desc = msg.descriptor_dyn();
    let Value::Object(obj) = json else {
        return Err(want(path, &format!("a JSON object ({})", desc.full_name()), json));
    };
    // Which member of each oneof is set, to refuse a second one rather than silently keep the last.
    let mut oneofs: Vec<(String, String)> = Vec::new();
    for (key, value) in obj {
        let field_path = join(path, key);
        let Some(field) = desc.field_by_name(key) else {
            let known: Vec<String> = desc.fields().map(|f| f.name().to_owned()).collect();
            return Err(format!(
                "unknown field {field_path:?}: {} has {}",
                desc.full_name(),
                if known.is_empty() {
                    "no fields".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        };
        // null means "not set", as in the proto3 JSON mapping.
        if value.is_null() {
            continue;
        }
        if let Some(oneof) = field.containing_oneof() {
            if let Some((_, other)) = oneofs.iter().find(|(o, _)| o == oneof.name()) {
                return Err(format!(
                    "{field_path}: {} and {key} are both members of the oneof {}; set only one",
                    join(path, other),
                    oneof.name()
                ));
            }
            oneofs.push((oneof.name().to_owned(), key.clone()));
        }
        match field.runtime_field_type() {
            RuntimeFieldType::Singular(t) => {
                let v = value_from_json(&t, value, &field_path)?;
                field.set_singular_field(msg, v);
            }
            RuntimeFieldType::Repeated(t) => {
                let Value::Array(items) = value else {
                    return Err(want(&field_path, "a JSON array", value));
                };
                let mut repeated = field.mut_repeated(msg);
                for (i, item) in items.iter().enumerate() {
                    repeated.push(value_from_json(&t, item, &format!("{field_path}[{i}]"))?);
                }
            }
            RuntimeFieldType::Map(key_type, value_type) => {
                let Value::Object(entries) = value else {
                    return Err(want(&field_path, "a JSON object (a map)", value));
                };
                let mut map = field.mut_map(msg);
                for (k, v) in entries {
                    let entry_path = format!("{field_path}[{k:?}]");
                    let key = map_key_from_json(&key_type, k, &entry_path)?;
                    map.insert(key, value_from_json(&value_type, v, &entry_path)?);
                }
            }
        }
    }
    Ok(())
}

fn value_from_json(t: &RuntimeType, v: &Value, path: &str) -> Result<ReflectValueBox, String> {
    Ok(match t {
        RuntimeType::I32 => ReflectValueBox::I32(integer(v, path)?),
        RuntimeType::I64 => ReflectValueBox::I64(integer(v, path)?),
        RuntimeType::U32 => ReflectValueBox::U32(integer(v, path)?),
        RuntimeType::U64 => ReflectValueBox::U64(integer(v, path)?),
        RuntimeType::F32 => ReflectValueBox::F32(float(v, path)? as f32),
        RuntimeType::F64 => ReflectValueBox::F64(float(v, path)?),
        RuntimeType::Bool => ReflectValueBox::Bool(v.as_bool().ok_or_else(|| want(path, "true or false", v))?),
        RuntimeType::String => ReflectValueBox::String(v.as_str().ok_or_else(|| want(path, "a string", v))?.to_owned()),
        RuntimeType::VecU8 => ReflectValueBox::Bytes(bytes(v, path)?),
        RuntimeType::Enum(e) => ReflectValueBox::Enum(e.clone(), enum_number(e, v, path)?),
        RuntimeType::Message(d) => ReflectValueBox::Message(message_from_json(d, v, path)?),
    })
}

fn message_from_json(d: &MessageDescriptor, v: &Value, path: &str) -> Result<Box<dyn MessageDyn>, String> {
    let mut m = d.new_instance();
    match wrapped_field(d) {
        Some(field) if !v.is_object() => {
            let value = value_from_json(&field.singular_runtime_type(), v, path)?;
            field.set_singular_field(&mut *m, value);
        }
        _ => fill_message(&mut *m, v, path)?,
    }
    Ok(m)
}

/// Integers come as JSON numbers or, as the proto3 JSON mapping writes 64-bit ones, as strings.
/// Both go through the target type's parser, which also checks the range.
fn integer<T: FromStr>(v: &Value, path: &str) -> Result<T, String> {
    let text = match v {
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        _ => return Err(want(path, "an integer", v)),
    };
    text.parse()
        .map_err(|_| format!("{}: {text} is not a valid {}", shown(path), std::any::type_name::<T>()))
}

fn float(v: &Value, path: &str) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| want(path, "a number", v)),
        // Rust's parser takes "NaN", "Infinity" and "-Infinity", the mapping's spellings.
        Value::String(s) => s.trim().parse().map_err(|_| want(path, "a number", v)),
        _ => Err(want(path, "a number", v)),
    }
}

/// CSI v1.9.0 has no bytes fields; an array of byte values keeps the conversion total without a
/// base64 codec.
fn bytes(v: &Value, path: &str) -> Result<Vec<u8>, String> {
    let Value::Array(items) = v else {
        return Err(want(path, "an array of byte values", v));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, b)| integer::<u8>(b, &format!("{path}[{i}]")))
        .collect()
}

/// Enums by name, or by number: proto3 enums are open, so an unknown number is passed on for the
/// driver to judge.
fn enum_number(e: &EnumDescriptor, v: &Value, path: &str) -> Result<i32, String> {
    match v {
        Value::String(name) => e.value_by_name(name).map(|ev| ev.value()).ok_or_else(|| {
            let names: Vec<String> = e.values().map(|ev| ev.name().to_owned()).collect();
            format!(
                "{}: {name:?} is not a {}; one of {}",
                shown(path),
                e.full_name(),
                names.join(", ")
            )
        }),
        Value::Number(_) => integer(v, path),
        _ => Err(want(path, &format!("a {} name or number", e.full_name()), v)),
    }
}

/// JSON object keys are strings; CSI's maps are all string-keyed, the rest is for completeness.
fn map_key_from_json(t: &RuntimeType, k: &str, path: &str) -> Result<ReflectValueBox, String> {
    match t {
        RuntimeType::String => Ok(ReflectValueBox::String(k.to_owned())),
        RuntimeType::Bool => match k {
            "true" => Ok(ReflectValueBox::Bool(true)),
            "false" => Ok(ReflectValueBox::Bool(false)),
            _ => Err(format!("{path}: a bool map key must be \"true\" or \"false\"")),
        },
        other => value_from_json(other, &Value::String(k.to_owned()), path),
    }
}

// ---- protobuf to JSON ----

/// Scalars outside a oneof are always printed, zero included, so a reader sees `"used": 0` and
/// `"abnormal": false` rather than wondering whether the field exists; unset messages, oneof
/// members that are not set, and empty lists and maps are left out.
fn message_to_json(m: &dyn MessageDyn) -> Value {
    let d = m.descriptor_dyn();
    if let Some(field) = wrapped_field(&d) {
        return value_to_json(field.get_singular_field_or_default(m));
    }
    let mut out = Map::new();
    for field in d.fields() {
        let v = match field.get_reflect(m) {
            ReflectFieldRef::Optional(o) => match o.value() {
                Some(v) => value_to_json(v),
                None if field.containing_oneof().is_none()
                    && !matches!(field.singular_runtime_type(), RuntimeType::Message(_)) =>
                {
                    value_to_json(field.get_singular_field_or_default(m))
                }
                None => continue,
            },
            ReflectFieldRef::Repeated(r) if !r.is_empty() => Value::Array(r.into_iter().map(value_to_json).collect()),
            ReflectFieldRef::Map(map) if !map.is_empty() => Value::Object(
                (&map)
                    .into_iter()
                    .map(|(k, v)| (map_key_to_string(k), value_to_json(v)))
                    .collect(),
            ),
            _ => continue,
        };
        out.insert(field.name().to_owned(), v);
    }
    Value::Object(out)
}

fn value_to_json(v: ReflectValueRef) -> Value {
    match v {
        ReflectValueRef::U32(n) => n.into(),
        ReflectValueRef::U64(n) => n.into(),
        ReflectValueRef::I32(n) => n.into(),
        ReflectValueRef::I64(n) => n.into(),
        // Through the f32's own shortest text, so 0.1f32 prints as 0.1 and not 0.100000001.
        ReflectValueRef::F32(x) => float_to_json(x.to_string().parse().unwrap_or(f64::from(x))),
        ReflectValueRef::F64(x) => float_to_json(x),
        ReflectValueRef::Bool(b) => b.into(),
        ReflectValueRef::String(s) => s.into(),
        ReflectValueRef::Bytes(b) => b.iter().map(|&x| Value::from(x)).collect(),
        ReflectValueRef::Enum(e, n) => e.value_by_number(n).map_or_else(|| n.into(), |ev| ev.name().into()),
        ReflectValueRef::Message(m) => message_to_json(&*m),
    }
}

/// JSON has no NaN or infinities; the proto3 JSON mapping spells them as strings.
fn float_to_json(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or_else(
        || {
            Value::from(if x.is_nan() {
                "NaN"
            } else if x > 0.0 {
                "Infinity"
            } else {
                "-Infinity"
            })
        },
        Value::Number,
    )
}

fn map_key_to_string(k: ReflectValueRef) -> String {
    match k {
        ReflectValueRef::String(s) => s.to_owned(),
        other => match value_to_json(other) {
            Value::String(s) => s,
            v => v.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_local_cache::proto::csi;
    use node_local_cache::proto::csi::volume_capability::access_mode::Mode;

    fn parse<M: MessageFull>(json: Value) -> Result<M, String> {
        let mut m = M::new();
        fill_message(&mut m, &json, "")?;
        Ok(m)
    }

    fn publish_json() -> Value {
        json!({
            "volume_id": "nlc-3f1c0d52-a1e4-5b8e-9f36-5d2c8a71e04b",
            "target_path": "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pv/mount",
            "volume_capability": {
                "mount": {"fs_type": "", "mount_flags": ["noatime", "nodev"], "volume_mount_group": "2000"},
                "access_mode": {"mode": "MULTI_NODE_MULTI_WRITER"}
            },
            "readonly": true,
            "secrets": {"token": "s3cret"},
            "volume_context": {"csi.storage.k8s.io/pod.name": "web-0", "b": "2"}
        })
    }

    #[test]
    fn publish_request_round_trips() {
        let req: csi::NodePublishVolumeRequest = parse(publish_json()).unwrap();
        assert_eq!(req.volume_id, "nlc-3f1c0d52-a1e4-5b8e-9f36-5d2c8a71e04b");
        assert!(req.readonly);
        let cap = req.volume_capability.as_ref().unwrap();
        assert!(cap.has_mount(), "the oneof member was set");
        assert_eq!(cap.mount().mount_flags, ["noatime", "nodev"]);
        assert_eq!(cap.mount().volume_mount_group, "2000");
        assert_eq!(cap.access_mode.mode.enum_value(), Ok(Mode::MULTI_NODE_MULTI_WRITER));
        assert_eq!(req.volume_context.len(), 2);
        assert_eq!(req.volume_context["csi.storage.k8s.io/pod.name"], "web-0");
        assert_eq!(req.secrets["token"], "s3cret");

        let back = message_to_json(&req);
        let again: csi::NodePublishVolumeRequest = parse(back.clone()).unwrap();
        assert_eq!(again, req);
        // Enum by name, oneof under its member's name, maps as objects, defaults printed.
        assert_eq!(
            back["volume_capability"]["access_mode"]["mode"],
            "MULTI_NODE_MULTI_WRITER"
        );
        assert_eq!(back["volume_capability"]["mount"]["mount_flags"][1], "nodev");
        assert!(back["volume_capability"].get("block").is_none());
        assert_eq!(back["volume_context"]["b"], "2");
        assert_eq!(back["staging_target_path"], "");
        assert!(back.get("publish_context").is_none(), "empty maps are left out");
    }

    #[test]
    fn enum_by_number_equals_enum_by_name() {
        let mut by_number = publish_json();
        by_number["volume_capability"]["access_mode"]["mode"] = json!(5);
        let a: csi::NodePublishVolumeRequest = parse(publish_json()).unwrap();
        let b: csi::NodePublishVolumeRequest = parse(by_number).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let e = parse::<csi::NodePublishVolumeRequest>(json!({
            "volume_capability": {"mount": {"fs_typo": "ext4"}}
        }))
        .unwrap_err();
        assert!(e.contains("\"volume_capability.mount.fs_typo\""), "{e}");
        assert!(e.contains("fs_type"), "lists the known fields: {e}");

        let e = parse::<csi::ProbeRequest>(json!({"verbose": true})).unwrap_err();
        assert!(e.contains("\"verbose\"") && e.contains("no fields"), "{e}");
    }

    #[test]
    fn two_members_of_a_oneof_are_refused() {
        let e = parse::<csi::VolumeCapability>(json!({"mount": {}, "block": {}})).unwrap_err();
        assert!(e.contains("block") && e.contains("mount") && e.contains("oneof"), "{e}");
    }

    #[test]
    fn bad_values_say_what_was_wanted() {
        let e = parse::<csi::NodePublishVolumeRequest>(json!({
            "volume_capability": {"access_mode": {"mode": "RWX"}}
        }))
        .unwrap_err();
        assert!(
            e.starts_with("volume_capability.access_mode.mode: \"RWX\"") && e.contains("MULTI_NODE_MULTI_WRITER"),
            "{e}"
        );
        let e = parse::<csi::NodePublishVolumeRequest>(json!({"readonly": "yes"})).unwrap_err();
        assert!(e.contains("readonly: want true or false"), "{e}");
        let e = parse::<csi::CreateVolumeRequest>(json!({"volume_capabilities": {}})).unwrap_err();
        assert!(e.contains("volume_capabilities: want a JSON array"), "{e}");
        let e = parse::<csi::CreateVolumeRequest>(json!({"parameters": {"a": 1}})).unwrap_err();
        assert!(e.contains("parameters[\"a\"]: want a string"), "{e}");
        let e = parse::<csi::CreateVolumeRequest>(json!({"volume_capabilities": [{"mount": []}]})).unwrap_err();
        assert!(e.contains("volume_capabilities[0].mount: want a JSON object"), "{e}");
        let e = fill_message(&mut csi::ProbeRequest::new(), &json!([]), "").unwrap_err();
        assert!(e.starts_with("request: want a JSON object"), "{e}");
    }

    #[test]
    fn int64_as_number_or_string_with_range_checks() {
        let r: csi::CreateVolumeRequest =
            parse(json!({"capacity_range": {"required_bytes": "1073741824", "limit_bytes": 2147483648u64}})).unwrap();
        assert_eq!(r.capacity_range.required_bytes, 1 << 30);
        assert_eq!(r.capacity_range.limit_bytes, 2 << 30);
        let e = parse::<csi::CreateVolumeRequest>(json!({"capacity_range": {"required_bytes": 1.5}})).unwrap_err();
        assert!(e.contains("capacity_range.required_bytes: want an integer"), "{e}");
        let e = parse::<csi::CreateVolumeRequest>(json!({"capacity_range": {"limit_bytes": u64::MAX}})).unwrap_err();
        assert!(e.contains("is not a valid i64"), "{e}");
    }

    #[test]
    fn wrappers_are_bare_values_both_ways() {
        let r: csi::ProbeResponse = parse(json!({"ready": true})).unwrap();
        assert!(r.ready.value);
        assert_eq!(message_to_json(&r), json!({"ready": true}));
        let nested: csi::ProbeResponse = parse(json!({"ready": {"value": true}})).unwrap();
        assert_eq!(nested, r);
        // An unset wrapper is absent; a set one prints even when false.
        assert_eq!(message_to_json(&csi::ProbeResponse::new()), json!({}));
        let f: csi::ProbeResponse = parse(json!({"ready": false})).unwrap();
        assert_eq!(message_to_json(&f), json!({"ready": false}));
        let c: csi::GetCapacityResponse = parse(json!({"maximum_volume_size": "42"})).unwrap();
        assert_eq!(message_to_json(&c)["maximum_volume_size"], 42);
    }

    #[test]
    fn null_leaves_a_field_unset() {
        let r: csi::NodePublishVolumeRequest = parse(json!({"volume_capability": null, "readonly": null})).unwrap();
        assert_eq!(r, csi::NodePublishVolumeRequest::new());
    }

    #[test]
    fn reply_with_repeated_oneof_and_enums_prints_names() {
        let mut usage = csi::VolumeUsage::new();
        usage.unit = csi::volume_usage::Unit::BYTES.into();
        usage.total = 100;
        let mut r = csi::NodeGetVolumeStatsResponse::new();
        r.usage.push(usage);
        r.volume_condition = Some(csi::VolumeCondition::new()).into();
        assert_eq!(
            message_to_json(&r),
            json!({
                "usage": [{"unit": "BYTES", "total": 100, "available": 0, "used": 0}],
                "volume_condition": {"abnormal": false, "message": ""}
            })
        );
    }

    /// Every RPC of the services in csi.proto is callable, under its own request type.
    #[test]
    fn table_covers_every_rpc_in_the_proto() {
        let table = rpcs();
        let file = csi::file_descriptor();
        let mut expected = 0;
        for service in file.services() {
            for method in service.methods() {
                expected += 1;
                let path = format!(
                    "/{}.{}/{}",
                    file.package(),
                    service.proto().name(),
                    method.proto().name()
                );
                let rpc = table
                    .iter()
                    .find(|r| r.path == path)
                    .unwrap_or_else(|| panic!("{path} missing from the table"));
                assert_eq!(rpc.request, method.input_type(), "{path}");
                // And an empty request builds for each.
                fill_message(&mut *rpc.request.new_instance(), &json!({}), "").unwrap();
            }
        }
        assert_eq!(table.len(), expected, "no extra or duplicate rows");
        let mut names: Vec<_> = table.iter().map(|r| r.name().to_ascii_lowercase()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), table.len(), "short names are unique, case aside");
        assert!(method_list(&table).contains("  Identity: GetPluginInfo, GetPluginCapabilities, Probe"));
    }

    #[test]
    fn status_names_are_grpc_canonical() {
        let s = |c: grpcio::RpcStatusCode| status_name(&RpcStatus::new(c));
        assert_eq!(s(grpcio::RpcStatusCode::NOT_FOUND), "NOT_FOUND");
        assert_eq!(s(grpcio::RpcStatusCode::UNAUTHENTICATED), "UNAUTHENTICATED");
        assert_eq!(s(grpcio::RpcStatusCode::from(99)), "CODE_99");
    }

    #[test]
    fn flags_are_consistent() {
        command().debug_assert();
    }
}
