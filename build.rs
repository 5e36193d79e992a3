//! Generates the CSI messages (rust-protobuf 3, pure Rust parser, no protoc) and the grpcio
//! service glue. The glue is written here rather than by grpcio-compiler, which only reads
//! rust-protobuf 2 descriptors and would put protobuf 2.x (RUSTSEC-2024-0437) into Cargo.lock.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

const PROTO: &str = "proto/csi.proto";

fn main() {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let raw_dir = out_dir.join("raw");
    fs::create_dir_all(&raw_dir).expect("create OUT_DIR/raw");

    protobuf_codegen::Codegen::new()
        .pure()
        .include("proto")
        .input(PROTO)
        .out_dir(&raw_dir)
        .run_from_script();
    strip_inner_attributes(&raw_dir.join("csi.rs"), &out_dir.join("csi.rs"));

    let parsed = protobuf_parse::Parser::new()
        .pure()
        .include("proto")
        .input(PROTO)
        .parse_and_typecheck()
        .expect("parse proto/csi.proto");
    let file = parsed
        .file_descriptors
        .iter()
        .find(|f| f.name() == "csi.proto")
        .expect("csi.proto descriptor");
    let glue = service_glue(file.package(), &file.service);
    fs::write(out_dir.join("csi_grpc.rs"), glue).expect("write csi_grpc.rs");
    fs::write(out_dir.join("csi_redact.rs"), redact_impls(&file.message_type)).expect("write csi_redact.rs");
}

/// `Redact` for every message: the ones with a `secrets` field empty it. The debug log prints a
/// request through `Debug` with this, not through rust-protobuf's reflection, which would link
/// ~0.8 MB of descriptors and text formatting into the node plugin.
fn redact_impls(messages: &[protobuf::descriptor::DescriptorProto]) -> String {
    let mut out = String::new();
    for m in messages {
        if m.field.iter().any(|f| f.name() == "secrets") {
            writeln!(
                out,
                "impl super::Redact for {} {{\n    fn redact(&mut self) {{\n        self.secrets.clear();\n    }}\n}}",
                m.name()
            )
            .unwrap();
        } else {
            writeln!(out, "impl super::Redact for {} {{}}", m.name()).unwrap();
        }
    }
    out
}

/// `include!` cannot take a file with inner attributes; the including module carries them.
fn strip_inner_attributes(from: &Path, to: &Path) {
    let text = fs::read_to_string(from).expect("read generated csi.rs");
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
        .flat_map(|l| [l, "\n"])
        .collect();
    fs::write(to, kept).expect("write csi.rs");
}

fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `.csi.v1.Foo` → `super::csi::Foo`; every CSI request and response is a top-level message.
fn rust_type(package: &str, proto_type: &str) -> String {
    let prefix = format!(".{package}.");
    let name = proto_type
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{proto_type} is outside package {package}"));
    assert!(!name.contains('.'), "nested rpc type {proto_type}");
    format!("super::csi::{name}")
}

/// The rpcs this driver serves. Each registered rpc costs ~2 KB of handler code in the binary;
/// one not registered is answered UNIMPLEMENTED by grpcio, as the CSI spec asks of an rpc a
/// plugin does not offer.
const SERVED: &[&str] = &[
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "CreateVolume",
    "DeleteVolume",
    "ValidateVolumeCapabilities",
    "ControllerGetCapabilities",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeGetCapabilities",
    "NodeGetInfo",
];

fn service_glue(package: &str, services: &[protobuf::descriptor::ServiceDescriptorProto]) -> String {
    let mut out = String::new();
    // The same list for the crate: the metrics count calls by these names.
    writeln!(out, "pub const SERVED: [&str; {}] = {SERVED:?};\n", SERVED.len()).unwrap();
    for svc in services {
        let svc_name = svc.name();
        let methods: Vec<_> = svc
            .method
            .iter()
            .map(|m| {
                assert!(
                    !m.client_streaming() && !m.server_streaming(),
                    "{svc_name}.{} streams; only unary rpcs are generated",
                    m.name()
                );
                (
                    m.name(),
                    snake_case(m.name()),
                    rust_type(package, m.input_type()),
                    rust_type(package, m.output_type()),
                    format!(
                        "METHOD_{}_{}",
                        snake_case(svc_name).to_uppercase(),
                        snake_case(m.name()).to_uppercase()
                    ),
                )
            })
            .collect();

        for (name, _, req, resp, konst) in &methods {
            writeln!(
                out,
                "pub const {konst}: ::grpcio::Method<{req}, {resp}> = ::grpcio::Method {{\n    \
                 ty: ::grpcio::MethodType::Unary,\n    \
                 name: \"/{package}.{svc_name}/{name}\",\n    \
                 req_mar: ::grpcio::Marshaller {{ ser: ::grpcio::pb_ser, de: ::grpcio::pb_de }},\n    \
                 resp_mar: ::grpcio::Marshaller {{ ser: ::grpcio::pb_ser, de: ::grpcio::pb_de }},\n}};\n"
            )
            .unwrap();
        }

        // Blocking client, used by the CSI client, the benchmark and the tests.
        writeln!(
            out,
            "#[derive(Clone)]\npub struct {svc_name}Client {{\n    pub client: ::grpcio::Client,\n}}\n"
        )
        .unwrap();
        writeln!(out, "impl {svc_name}Client {{").unwrap();
        writeln!(
            out,
            "    pub fn new(channel: ::grpcio::Channel) -> Self {{\n        \
             {svc_name}Client {{ client: ::grpcio::Client::new(channel) }}\n    }}\n"
        )
        .unwrap();
        for (_, snake, req, resp, konst) in &methods {
            writeln!(
                out,
                "    pub fn {snake}_opt(&self, req: &{req}, opt: ::grpcio::CallOption) -> ::grpcio::Result<{resp}> {{\n        \
                 self.client.unary_call(&{konst}, req, opt)\n    }}\n\n    \
                 pub fn {snake}(&self, req: &{req}) -> ::grpcio::Result<{resp}> {{\n        \
                 self.{snake}_opt(req, ::grpcio::CallOption::default())\n    }}\n"
            )
            .unwrap();
        }
        writeln!(out, "}}\n").unwrap();

        // Server trait: the rpcs the driver serves, each one to implement; only they are
        // registered, and grpcio answers any other rpc UNIMPLEMENTED.
        let served: Vec<_> = methods.iter().filter(|m| SERVED.contains(&m.0)).collect();
        writeln!(out, "pub trait {svc_name} {{").unwrap();
        for (_, snake, req, resp, _) in &served {
            writeln!(
                out,
                "    fn {snake}(&mut self, ctx: ::grpcio::RpcContext, req: {req}, sink: ::grpcio::UnarySink<{resp}>);"
            )
            .unwrap();
        }
        writeln!(out, "}}\n").unwrap();

        writeln!(
            out,
            "pub fn create_{}<S: {svc_name} + Send + Clone + 'static>(s: S) -> ::grpcio::Service {{\n    \
             let mut builder = ::grpcio::ServiceBuilder::new();",
            snake_case(svc_name)
        )
        .unwrap();
        for (_, snake, _, _, konst) in &served {
            writeln!(
                out,
                "    let mut instance = s.clone();\n    \
                 builder = builder.add_unary_handler(&{konst}, move |ctx, req, resp| instance.{snake}(ctx, req, resp));"
            )
            .unwrap();
        }
        writeln!(out, "    builder.build()\n}}\n").unwrap();
    }
    out
}
