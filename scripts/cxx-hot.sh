#!/bin/sh
# The C++ compiler for gRPC's C core (.cargo/config.toml points CXX here). The release profile
# builds the core for size (-Os); the sources below, which every call runs through (the call,
# its filters, the HTTP/2 transport, the poller and the closures that tie them together), are
# built at -O3 instead. Against the whole core at -Os: 23 % fewer instructions per
# publish/unpublish cycle for 0.25 MB of binary; against the whole core at -O3: the same
# instructions for 1.1 MB less (callgrind, docs/performance.md, issue 14). A build that is not
# size-first (no -Os, e.g. a debug build) and every other source pass through unchanged.
set -eu
src=""
size_first=0
prev=""
for arg in "$@"; do
    if [ "$prev" = -c ]; then src=$arg; fi
    if [ "$arg" = -Os ]; then size_first=1; fi
    prev=$arg
done
if [ "$size_first" = 1 ]; then
    # message_size_filter.cc stays for the clients' calls (csi-client, csi-bench): the node
    # plugin no longer registers that filter (src/grpc_plugins.rs).
    case "$src" in
    */grpc/src/core/ext/filters/deadline/deadline_filter.cc | \
    */grpc/src/core/ext/filters/http/message_compress/compression_filter.cc | \
    */grpc/src/core/ext/filters/http/server/http_server_filter.cc | \
    */grpc/src/core/ext/filters/message_size/message_size_filter.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/chttp2_transport.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/flow_control.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/frame_data.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/frame_window_update.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/hpack_encoder.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/hpack_parser.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/parsing.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/stream_lists.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/stream_map.cc | \
    */grpc/src/core/ext/transport/chttp2/transport/writing.cc | \
    */grpc/src/core/lib/channel/channel_stack.cc | \
    */grpc/src/core/lib/channel/promise_based_filter.cc | \
    */grpc/src/core/lib/gpr/posix/time.cc | \
    */grpc/src/core/lib/gpr/time.cc | \
    */grpc/src/core/lib/gprpp/mpscq.cc | \
    */grpc/src/core/lib/gprpp/status_helper.cc | \
    */grpc/src/core/lib/gprpp/time.cc | \
    */grpc/src/core/lib/iomgr/call_combiner.cc | \
    */grpc/src/core/lib/iomgr/combiner.cc | \
    */grpc/src/core/lib/iomgr/ev_epoll1_linux.cc | \
    */grpc/src/core/lib/iomgr/exec_ctx.cc | \
    */grpc/src/core/lib/iomgr/tcp_posix.cc | \
    */grpc/src/core/lib/resource_quota/arena.cc | \
    */grpc/src/core/lib/slice/slice.cc | \
    */grpc/src/core/lib/slice/slice_buffer.cc | \
    */grpc/src/core/lib/surface/byte_buffer.cc | \
    */grpc/src/core/lib/surface/call.cc | \
    */grpc/src/core/lib/surface/completion_queue.cc | \
    */grpc/src/core/lib/surface/server.cc | \
    */grpc/src/core/lib/transport/error_utils.cc | \
    */grpc/src/core/lib/transport/metadata_batch.cc | \
    */grpc/src/core/lib/transport/transport.cc)
        exec c++ "$@" -O3
        ;;
    esac
fi
exec c++ "$@"
