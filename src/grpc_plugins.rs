//! Which of the gRPC C core's plugins this binary registers.
//!
//! At start-up the core builds its configuration by calling `grpc_core::BuildCoreConfiguration`,
//! which in the stock build registers every load-balancing policy, resolver and filter it was
//! compiled with: round robin, weighted round robin, priority, outlier detection, grpclb, RLS,
//! fault injection, DNS, HTTP proxies... A CSI plugin serves one Unix socket, and its clients
//! (csi-client, csi-bench, the tests) dial a Unix socket: none of those are ever used, yet
//! registering them touches their code at start (resident memory on every node) and keeps it in
//! the binary. Each binary defines `BuildCoreConfiguration` itself, through
//! `grpc_core_configuration!`, with only the plugins its side needs: the node plugin a
//! Unix-socket server's, the clients also a Unix-socket channel's. The linker then never takes
//! the stock definition (an archive member that defines nothing else) nor the code only it
//! reaches; in the node plugin that includes the whole client channel.
//!
//! Two filters every server call would otherwise pass through are left out too, because the
//! core runs each of them through its promise-to-callback adapter: 7,000 to 10,000 instructions
//! per call each (measured with callgrind, docs/performance.md):
//! - the server call tracer filter (registered with the builtins), which does nothing unless an
//!   OpenCensus/OpenTelemetry call tracer is installed; none is. `RegisterServerCallTracerFilter`
//!   is defined here as a no-op, as `BuildCoreConfiguration` is.
//! - the security filters: with the insecure credentials a CSI Unix socket uses, the server's
//!   auth filter only fills in a per-call auth context from a connection that carries no
//!   identity, and runs an auth metadata processor when one is set (none is); the client's only
//!   attaches call credentials (none are used).
//!
//! The node plugin also leaves out the message-size filter (promise-based as well): on a server
//! it checks the whole received message against the receive limit, which the compression filter
//! already does (gRPC's 4 MiB, RESOURCE_EXHAUSTED). The clients keep it for their send limit.
//!
//! The names are the C++ (Itanium ABI) names of the functions in the pinned grpcio-sys
//! (`=0.13.0`, gRPC 1.56.2). A rename in another gRPC fails the link; a new plugin that the
//! core needs shows up in the test suite, which runs every call through this configuration.
//! Each takes one pointer and returns nothing, which the C and C++ ABIs pass alike.

use std::sync::atomic::{AtomicBool, Ordering};

/// `grpc_core::CoreConfiguration::Builder`: only ever passed through.
#[repr(C)]
pub struct CoreBuilder {
    _opaque: [u8; 0],
}

extern "C" {
    #[link_name = "_ZN17grpc_event_engine12experimental44RegisterEventEngineChannelArgPreconditioningEPN9grpc_core17CoreConfiguration7BuilderE"]
    fn register_event_engine_channel_args(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core28RegisterTCPConnectHandshakerEPNS_17CoreConfiguration7BuilderE"]
    fn register_tcp_connect_handshaker(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core25RegisterPickFirstLbPolicyEPNS_17CoreConfiguration7BuilderE"]
    fn register_pick_first(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core31BuildClientChannelConfigurationEPNS_17CoreConfiguration7BuilderE"]
    fn build_client_channel_configuration(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core35SecurityRegisterHandshakerFactoriesEPNS_17CoreConfiguration7BuilderE"]
    fn register_security_handshakers(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core29RegisterClientAuthorityFilterEPNS_17CoreConfiguration7BuilderE"]
    fn register_client_authority_filter(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core26RegisterChannelIdleFiltersEPNS_17CoreConfiguration7BuilderE"]
    fn register_channel_idle_filters(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core19RegisterHttpFiltersEPNS_17CoreConfiguration7BuilderE"]
    fn register_http_filters(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core22RegisterDeadlineFilterEPNS_17CoreConfiguration7BuilderE"]
    fn register_deadline_filter(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core25RegisterMessageSizeFilterEPNS_17CoreConfiguration7BuilderE"]
    fn register_message_size_filter(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core37RegisterServiceConfigChannelArgFilterEPNS_17CoreConfiguration7BuilderE"]
    fn register_service_config_channel_arg_filter(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core21RegisterResourceQuotaEPNS_17CoreConfiguration7BuilderE"]
    fn register_resource_quota(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core24RegisterSockaddrResolverEPNS_17CoreConfiguration7BuilderE"]
    fn register_sockaddr_resolver(b: *mut CoreBuilder);
    #[link_name = "_ZN9grpc_core16RegisterBuiltinsEPNS_17CoreConfiguration7BuilderE"]
    fn register_builtins(b: *mut CoreBuilder);
}

/// Set once the core has built its configuration through this module.
static IN_EFFECT: AtomicBool = AtomicBool::new(false);

/// What a Unix-socket server needs from the stock configuration, in its order: channel args,
/// the insecure credentials' handshaker, the server's filters and transport. Kept out, besides
/// what `build_for_client` also keeps out, is everything only a channel uses (the client
/// channel, pick_first, the `unix:` resolver, the authority and service config filters, the
/// TCP connect handshaker): the node plugin never dials, and without these references the
/// linker leaves the client channel's code out of its binary (0.23 MB, docs/performance.md).
/// So is the message-size filter (see the module's comment): a tenth of a call's user-space
/// instructions.
///
/// # Safety
/// Only as the core's `BuildCoreConfiguration`, with the builder it passes: use
/// `grpc_core_configuration!(server)`.
pub unsafe fn build_for_server(builder: *mut CoreBuilder) {
    // SAFETY: the caller passes the core's builder; each function registers into it and is one
    // the stock configuration calls with it.
    unsafe {
        register_event_engine_channel_args(builder);
        register_security_handshakers(builder);
        register_channel_idle_filters(builder);
        register_http_filters(builder);
        register_deadline_filter(builder);
        register_resource_quota(builder);
        register_builtins(builder);
    }
    IN_EFFECT.store(true, Ordering::Release);
}

/// What a Unix-socket client (and server) needs: the stock configuration, in its order, less
/// the HTTP CONNECT handshaker and proxy mapper, every load-balancing policy but pick_first,
/// the DNS and fake resolvers, grpclb, RLS, fault injection, backend metrics and the security
/// filters.
///
/// # Safety
/// Only as the core's `BuildCoreConfiguration`, with the builder it passes: use
/// `grpc_core_configuration!(client)`.
pub unsafe fn build_for_client(builder: *mut CoreBuilder) {
    // SAFETY: as in `build_for_server`.
    unsafe {
        register_event_engine_channel_args(builder);
        register_tcp_connect_handshaker(builder);
        register_pick_first(builder);
        build_client_channel_configuration(builder);
        register_security_handshakers(builder);
        register_client_authority_filter(builder);
        register_channel_idle_filters(builder);
        register_http_filters(builder);
        register_deadline_filter(builder);
        register_message_size_filter(builder);
        register_service_config_channel_arg_filter(builder);
        register_resource_quota(builder);
        register_sockaddr_resolver(builder);
        register_builtins(builder);
    }
    IN_EFFECT.store(true, Ordering::Release);
}

/// Defines the gRPC core's configuration in the binary that invokes it (once, at its top
/// level): `server` for the node plugin, `client` for a binary that dials a CSI socket. The
/// definition has to be in the binary, not in this library, because what it registers decides
/// what the linker keeps. A binary without it gets the stock configuration.
#[macro_export]
macro_rules! grpc_core_configuration {
    (server) => {
        $crate::grpc_core_configuration!(@define build_for_server);
    };
    (client) => {
        $crate::grpc_core_configuration!(@define build_for_client);
    };
    (@define $build:ident) => {
        #[export_name = "_ZN9grpc_core22BuildCoreConfigurationEPNS_17CoreConfiguration7BuilderE"]
        extern "C" fn build_core_configuration(builder: *mut $crate::grpc_plugins::CoreBuilder) {
            // SAFETY: the core calls this once, with its builder, from `CoreConfiguration::Get`.
            unsafe { $crate::grpc_plugins::$build(builder) }
        }
    };
}

/// Registers nothing: the builtins call this to add the server call tracer filter, a pass-through
/// unless a call tracer is installed. Defined here, the linker never takes the core's.
#[export_name = "_ZN9grpc_core30RegisterServerCallTracerFilterEPNS_17CoreConfiguration7BuilderE"]
extern "C" fn register_server_call_tracer_filter(_builder: *mut CoreBuilder) {}

/// Whether the core was configured here rather than by its stock configuration (which the
/// linker takes if this module's definition did not make it into the binary). Meaningful once
/// a gRPC environment exists.
pub fn in_effect() -> bool {
    IN_EFFECT.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    crate::grpc_core_configuration!(client);

    #[test]
    fn the_core_is_configured_here() {
        let env = std::sync::Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
        let _server = grpcio::ServerBuilder::new(env).build().unwrap();
        assert!(super::in_effect(), "the stock gRPC plugin registry was linked instead");
    }
}
