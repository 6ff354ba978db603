//! The prost and tonic bindings under `src/gen/` are checked in, so building flyball needs no
//! protobuf compiler. This test compiles `flyball/v1/*.proto` again with protox (a pure Rust
//! compiler) and fails on any difference. To update the bindings after editing the .proto:
//!
//!     FLYBALL_REGENERATE=1 cargo test -p flyball-proto --test generated_code

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let messages = out.join("messages");
    let grpc = out.join("grpc");
    std::fs::create_dir_all(&messages)?;
    for dir in ["", "client", "server", "forward"].map(|sub| grpc.join(sub)) {
        std::fs::create_dir_all(dir)?;
    }

    let descriptors = protox::compile(
        ["flyball/v1/telemetry.proto", "flyball/v1/replication.proto"],
        [crate_dir()],
    )?;
    let files = descriptors.clone();
    prost_build::Config::new()
        .out_dir(&messages)
        .compile_fds(files)?;

    // Service code is generated apart from the messages so that the messages build for wasm32
    // without tonic.
    // Gateways send `ReportRequest`s; the control service's server receives each with the
    // bytes it arrived as (`ReceivedReport`), and a follower passes those bytes on to the leader
    // (`EncodedReport`). So the client, the server and the forwarding client are generated
    // apart.
    let telemetry_methods = |input: &str, codec: &str| {
        let report = tonic_build::manual::Method::builder()
            .name("report")
            .route_name("Report")
            .input_type(input)
            .output_type("crate::v1::ReportResponse")
            .codec_path(codec)
            .build();
        let report_stream = tonic_build::manual::Method::builder()
            .name("report_stream")
            .route_name("ReportStream")
            .input_type(input)
            .output_type("crate::v1::ReportResponse")
            .codec_path(codec)
            .client_streaming()
            .server_streaming()
            .build();
        tonic_build::manual::Service::builder()
            .name("TelemetryService")
            .package("flyball.v1")
            .method(report)
            .method(report_stream)
            .build()
    };
    // Reports go to followers as the leader encoded them once (`EncodedReport`, whose bytes
    // are a `ReportRequest`'s).
    let follow = tonic_build::manual::Method::builder()
        .name("follow")
        .route_name("Follow")
        .input_type("crate::v1::FollowRequest")
        .output_type("crate::codec::EncodedReport")
        .codec_path("crate::codec::WireCodec")
        .server_streaming()
        .build();
    // The services are described by hand (tonic's manual builder takes no descriptors): check
    // that the description says what the .proto files say.
    let methods: Vec<(String, String, bool, bool)> = descriptors
        .file
        .iter()
        .flat_map(|file| file.service.iter())
        .flat_map(|service| {
            service.method.iter().map(|m| {
                (
                    service.name().to_owned(),
                    m.name().to_owned(),
                    m.client_streaming(),
                    m.server_streaming(),
                )
            })
        })
        .collect();
    let described: Vec<(String, String, bool, bool)> = [
        ("TelemetryService", "Report", false, false),
        ("TelemetryService", "ReportStream", true, true),
        ("ReplicationService", "Follow", false, true),
    ]
    .iter()
    .map(|(s, m, c, r)| (s.to_string(), m.to_string(), *c, *r))
    .collect();
    if methods != described {
        return Err(format!(
            "the .proto files have methods {methods:?}, the generator {described:?}"
        )
        .into());
    }
    let replication = tonic_build::manual::Service::builder()
        .name("ReplicationService")
        .package("flyball.v1")
        .method(follow)
        .build();
    tonic_build::manual::Builder::new()
        .out_dir(&grpc)
        .compile(&[replication]);
    for (dir, input, codec) in [
        (
            "client",
            "crate::v1::ReportRequest",
            "crate::codec::ReportCodec",
        ),
        (
            "forward",
            "crate::codec::EncodedReport",
            "crate::codec::WireCodec",
        ),
        (
            "server",
            "crate::codec::ReceivedReport",
            "crate::codec::IngestCodec",
        ),
    ] {
        let server = dir == "server";
        tonic_build::manual::Builder::new()
            .out_dir(grpc.join(dir))
            .build_client(!server)
            .build_server(server)
            .compile(&[telemetry_methods(input, codec)]);
    }
    Ok(())
}

#[test]
fn checked_in_bindings_match_the_proto() -> Result<(), Box<dyn std::error::Error>> {
    let scratch = std::env::temp_dir().join(format!("flyball-proto-gen-{}", std::process::id()));
    generate(&scratch)?;
    let pairs = [
        (
            scratch.join("messages/flyball.v1.rs"),
            crate_dir().join("src/gen/flyball.v1.rs"),
        ),
        (
            scratch.join("grpc/client/flyball.v1.TelemetryService.rs"),
            crate_dir().join("src/gen/grpc/client/flyball.v1.TelemetryService.rs"),
        ),
        (
            scratch.join("grpc/forward/flyball.v1.TelemetryService.rs"),
            crate_dir().join("src/gen/grpc/forward/flyball.v1.TelemetryService.rs"),
        ),
        (
            scratch.join("grpc/server/flyball.v1.TelemetryService.rs"),
            crate_dir().join("src/gen/grpc/server/flyball.v1.TelemetryService.rs"),
        ),
        (
            scratch.join("grpc/flyball.v1.ReplicationService.rs"),
            crate_dir().join("src/gen/grpc/flyball.v1.ReplicationService.rs"),
        ),
    ];
    let regenerate = std::env::var_os("FLYBALL_REGENERATE").is_some();
    let mut stale = Vec::new();
    for (fresh, checked_in) in &pairs {
        let fresh_text = std::fs::read_to_string(fresh)?;
        let old_text = std::fs::read_to_string(checked_in).unwrap_or_default();
        if fresh_text != old_text {
            if regenerate {
                std::fs::write(checked_in, &fresh_text)?;
            } else {
                stale.push(checked_in.display().to_string());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        stale.is_empty(),
        "generated bindings are out of date: {stale:?}; run FLYBALL_REGENERATE=1 cargo test -p flyball-proto --test generated_code"
    );
    Ok(())
}
