//! docs/ARCHITECTURE.md names files and folders a newcomer edits: every path it names in
//! backticks must exist, so the map cannot drift from the tree.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step fails the test"
)]

use std::path::Path;

#[test]
fn every_path_in_the_architecture_map_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let mut checked = 0;
    let mut missing = Vec::new();
    for (index, part) in text.split('`').enumerate() {
        // Odd parts are inside backticks; a path has a slash and no spaces.
        let looks_like_path = index % 2 == 1
            && part.contains('/')
            && !part.contains(' ')
            && !part.contains("://")
            && (part.ends_with('/') || part.rsplit('/').next().is_some_and(|f| f.contains('.')));
        if !looks_like_path {
            continue;
        }
        checked += 1;
        if !root.join(part).exists() {
            missing.push(part.to_string());
        }
    }
    assert!(
        checked >= 20,
        "only {checked} paths found: is the table still there?"
    );
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {missing:?}"
    );
}

#[test]
fn every_operator_module_is_on_the_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("../docs/ARCHITECTURE.md")).unwrap();
    for entry in std::fs::read_dir(root.join("src")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name == "testing.rs" {
            continue;
        }
        assert!(
            text.contains(&name),
            "docs/ARCHITECTURE.md does not mention src/{name}"
        );
    }
}
