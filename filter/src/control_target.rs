//! How the filter names the control service to Envoy's gRPC client.
//!
//! `proxy_grpc_call` takes either a bare cluster name or a serialized
//! `envoy.config.core.v3.GrpcService`. A bare name that happens to parse as that proto, or that
//! makes client creation fail, yields `BadArgument`, on which the SDK's wrapper panics and traps
//! the VM. A serialized `GrpcService { envoy_grpc { cluster_name, authority } }` always parses, sets
//! the `:authority` the control service sees (Istio routes by it), and turns a missing cluster
//! into an ordinary failed call.

use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
struct GrpcService {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpc>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(string, tag = "2")]
    authority: String,
}

/// The serialized `GrpcService` for `cluster`, as the `&str` the SDK's call takes. `None` when the
/// encoding is not UTF-8, which happens only for names of 128 bytes or more (length varints);
/// configuration validation refuses those.
pub(crate) fn encode(cluster: &str, authority: Option<&str>) -> Option<String> {
    let service = GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.to_owned(),
            authority: authority.unwrap_or(cluster).to_owned(),
        }),
    };
    String::from_utf8(service.encode_to_vec()).ok()
}
