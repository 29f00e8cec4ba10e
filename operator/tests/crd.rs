//! The committed CRD YAML (crds/generated and the chart's copy) must be what the Rust types

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step fails the test"
)]
//! generate: `make crds` regenerates both.

use std::path::Path;

fn generated() -> String {
    serde_yaml::to_string(&schemagate_crds::crd()).unwrap()
}

fn committed(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn committed_crd_matches_the_types() {
    assert!(
        committed("crds/generated/databasemigrations.schemagate.dev.yaml") == generated(),
        "crds/generated is stale: run `make crds`"
    );
}

#[test]
fn chart_crd_matches_the_types() {
    assert!(
        committed("charts/schemagate/crds/databasemigrations.schemagate.dev.yaml") == generated(),
        "the chart's CRD is stale: run `make crds`"
    );
}

#[test]
fn crd_documents_every_field_and_prints_columns() {
    let crd = serde_json::to_value(schemagate_crds::crd()).unwrap();
    let version = &crd["spec"]["versions"][0];
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Revision", "Applied", "Phase", "Ready", "Age"]);
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "dbm");

    // `kubectl explain` shows descriptions: every property of spec and status has one.
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, property) in properties {
                let here = format!("{path}.{name}");
                if property.get("description").is_none() && !path.contains("env") {
                    missing.push(here.clone());
                }
                if !here.contains(".env")
                    && !here.contains(".resources")
                    && !here.contains("ecurityContext")
                {
                    walk(&here, property, missing);
                }
            }
        }
        if let Some(items) = schema.get("items") {
            walk(path, items, missing);
        }
    }
    let schema = &version["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    walk("", &schema["properties"]["spec"], &mut missing);
    walk("", &schema["properties"]["status"], &mut missing);
    missing.retain(|p| !p.starts_with(".conditions"));
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

/// `TrackingTool::ALL` is the one list of tools the operator, its CLI and its messages use:
/// it must hold every tool the CRD accepts, spelled as the CRD spells it.
#[test]
fn the_list_of_tools_is_every_tool_the_crd_accepts() {
    let crd = serde_json::to_value(schemagate_crds::crd()).unwrap();
    let accepted: Vec<String> =
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["database"]["properties"]["tracking"]["properties"]["tool"]["enum"]
            .as_array()
            .expect("the tool enum in the CRD")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
    let listed: Vec<String> = schemagate_crds::TrackingTool::ALL
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    assert_eq!(listed, accepted);
    for tool in schemagate_crds::TrackingTool::ALL {
        assert_eq!(serde_json::to_value(tool).unwrap(), tool.name());
    }
}
