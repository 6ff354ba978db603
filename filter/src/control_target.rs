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

/// The serialized `GrpcService` for `cluster`, as the `&str` the SDK's call takes. The authority
/// is left out when it is the cluster's name, Envoy's default. `None` when the encoding is not
/// UTF-8 (128 bytes or more: length varints), which configuration validation refuses first.
pub(crate) fn encode(cluster: &str, authority: Option<&str>) -> Option<String> {
    let service = GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.to_owned(),
            authority: authority
                .filter(|a| *a != cluster)
                .unwrap_or_default()
                .to_owned(),
        }),
    };
    String::from_utf8(service.encode_to_vec()).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use flyball_filter_core::config::FilterConfig;

    /// Validation lets through exactly what encodes, so the glue's `None` is never reached.
    #[test]
    fn configuration_accepts_exactly_the_names_that_encode() {
        for cluster_len in 1..=140 {
            let cluster = "c".repeat(cluster_len);
            for authority in [
                None,
                Some(cluster.clone()),
                Some("a".repeat(10)),
                Some("a".repeat(70)),
            ] {
                // Plain letters: nothing to escape.
                let json = match &authority {
                    Some(a) => {
                        format!(r#"{{"controlCluster":"{cluster}","controlAuthority":"{a}"}}"#)
                    }
                    None => format!(r#"{{"controlCluster":"{cluster}"}}"#),
                };
                let accepted = FilterConfig::from_json(json.as_bytes()).is_ok();
                let encoded = encode(&cluster, authority.as_deref());
                assert_eq!(
                    accepted,
                    encoded.is_some(),
                    "cluster of {cluster_len} bytes, authority {:?}",
                    authority.as_ref().map(String::len)
                );
            }
        }
        // Istio's name for the chart's Service, with the authority left to its default.
        assert!(
            encode(
                "outbound|9090||flyball-control.flyball-system.svc.cluster.local",
                None
            )
            .is_some()
        );
    }

    #[test]
    fn an_authority_that_is_the_cluster_name_is_left_to_envoy() {
        assert_eq!(encode("flyball", Some("flyball")), encode("flyball", None));
        assert_ne!(
            encode("flyball", Some("flyball.svc")),
            encode("flyball", None)
        );
    }
}
