//! The checked-in CRD YAML matches what the code generates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

#[test]
fn checked_in_crd_yaml_is_up_to_date() {
    let generated = flyball_k8s::crd_yaml().unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(flyball_k8s::crd::CRD_PATH);
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        // Regenerate so the developer only has to review and commit, then fail so CI notices.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
        panic!(
            "{} was out of date and has been regenerated; review the diff and commit it \
             (command: cargo test -p flyball-k8s --test crd)",
            flyball_k8s::crd::CRD_PATH
        );
    }
}
