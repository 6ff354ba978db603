//! The KEDA external scaler bindings in `src/gen/externalscaler.rs` are checked in, so building
//! flyball needs no protobuf compiler. This test compiles `proto/externalscaler.proto` again with
//! protox (a pure Rust compiler) and tonic-prost-build, and fails on any difference. To update the
//! bindings after editing the .proto:
//!
//!     FLYBALL_REGENERATE=1 cargo test -p flyball-control --test generated_code
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn checked_in_keda_bindings_match_the_proto() -> Result<(), Box<dyn std::error::Error>> {
    let scratch = std::env::temp_dir().join(format!("flyball-keda-gen-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let descriptors = protox::compile(["externalscaler.proto"], [crate_dir().join("proto")])?;
    // Client and server both: the server is flyball's, the client is for tests.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .out_dir(&scratch)
        .compile_fds(descriptors)?;

    let fresh = std::fs::read_to_string(scratch.join("externalscaler.rs"))?;
    let checked_in_path = crate_dir().join("src/gen/externalscaler.rs");
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&scratch);
    if fresh != checked_in && std::env::var_os("FLYBALL_REGENERATE").is_some() {
        std::fs::write(&checked_in_path, &fresh)?;
        return Ok(());
    }
    assert!(
        fresh == checked_in,
        "src/gen/externalscaler.rs is out of date; run \
         FLYBALL_REGENERATE=1 cargo test -p flyball-control --test generated_code"
    );
    Ok(())
}
