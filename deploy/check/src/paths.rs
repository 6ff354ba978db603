//! Where the checked files live, found from this crate's own directory so the tests run from any
//! working directory.

use std::path::{Path, PathBuf};

/// The workspace root (`deploy/check/../..`).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// `deploy/` at the workspace root.
pub fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// Where the upstream CRD schemas are looked for: `shared/schemas` beside the workspace root.
pub fn shared_schemas_dir() -> PathBuf {
    let root = repo_root();
    root.parent()
        .unwrap_or(&root)
        .join("shared")
        .join("schemas")
}

/// The upstream CRD schemas folder, if it exists.
pub fn shared_schemas() -> Option<PathBuf> {
    let dir = shared_schemas_dir();
    dir.is_dir().then_some(dir)
}

/// Every file under `dir` whose name ends with one of `extensions`, sorted, skipping build output.
pub fn files_under(dir: &Path, extensions: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "target") {
                    continue;
                }
                pending.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// `path` relative to the workspace root, for messages.
pub fn display(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}
