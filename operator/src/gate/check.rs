//! `schemagate check`: the pre-deployment check for pipelines. Lists opted-in Deployments,
//! the revision each needs and what the database reports; pending ones make it fail.

use crate::gate::{self, Verdict};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams};
use kube::core::DeserializeGuard;
use kube::{Client, ResourceExt};
use schemagate_crds::{DatabaseMigration, MIGRATION_LABEL};
use std::collections::HashMap;

/// One opted-in Deployment as `check` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRow {
    pub namespace: String,
    pub deployment: String,
    pub migration: String,
    pub required: Option<String>,
    pub applied: Option<String>,
    pub pending: bool,
    pub message: String,
    /// The Deployment's current template has rolled out: every replica updated and
    /// available, nothing paused.
    pub rolled_out: bool,
    /// Held, and its migration needs a person (failed, drifted, stalled): why, as the
    /// DatabaseMigration says it (the migrator's output tail, secrets removed).
    pub failed: Option<String>,
}

/// Whether a Deployment's current template has rolled out completely.
pub fn rolled_out(deployment: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&deployment.spec, &deployment.status) else {
        return false;
    };
    let replicas = spec.replicas.unwrap_or(1);
    spec.paused != Some(true)
        && status.observed_generation >= deployment.metadata.generation
        && status.updated_replicas.unwrap_or(0) == replicas
        && status.available_replicas.unwrap_or(0) == replicas
        && status.replicas.unwrap_or(0) == replicas
}

/// Why a held row's migration will not get there without a person, if it will not: its
/// Stalled condition for the current spec.
fn stalled(migration: Option<&DeserializeGuard<DatabaseMigration>>) -> Option<String> {
    let migration = migration?.0.as_ref().ok()?;
    let status = migration.status.as_ref()?;
    let stalled = crate::conditions::find(&status.conditions, schemagate_crds::condition::STALLED)?;
    (stalled.status == "True" && stalled.observed_generation == migration.metadata.generation)
        .then(|| stalled.message.clone())
}

/// Checks the opted-in Deployments of one namespace, or of all when `None`.
pub async fn check(client: &Client, namespace: Option<&str>) -> Result<Vec<CheckRow>, kube::Error> {
    let (deployments, migrations): (Api<Deployment>, Api<DeserializeGuard<DatabaseMigration>>) =
        match namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    let deployments = deployments
        .list(&ListParams::default().labels(MIGRATION_LABEL))
        .await?
        .items;
    let migrations: HashMap<(String, String), DeserializeGuard<DatabaseMigration>> = migrations
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|m| {
            let key = match &m.0 {
                Ok(m) => (m.namespace().unwrap_or_default(), m.name_any()),
                Err(invalid) => (
                    invalid.metadata.namespace.clone().unwrap_or_default(),
                    invalid.metadata.name.clone().unwrap_or_default(),
                ),
            };
            (key, m)
        })
        .collect();
    let mut rows: Vec<CheckRow> = deployments
        .iter()
        .map(|deployment| row(deployment, &migrations))
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.deployment).cmp(&(&b.namespace, &b.deployment)));
    Ok(rows)
}

fn row(
    deployment: &Deployment,
    migrations: &HashMap<(String, String), DeserializeGuard<DatabaseMigration>>,
) -> CheckRow {
    let namespace = deployment.namespace().unwrap_or_default();
    let migration_name = deployment
        .labels()
        .get(MIGRATION_LABEL)
        .cloned()
        .unwrap_or_default();
    let migration = migrations.get(&(namespace.clone(), migration_name.clone()));
    let applied = migration
        .and_then(|m| m.0.as_ref().ok())
        .and_then(|m| m.status.as_ref())
        .and_then(|s| s.applied_revision.clone());
    let Some(requirement) = gate::requirement(deployment) else {
        return CheckRow {
            namespace,
            deployment: deployment.name_any(),
            migration: migration_name,
            required: None,
            applied,
            pending: false,
            message: "no schemagate.dev/revision annotation on the pod template: not gated".into(),
            rolled_out: rolled_out(deployment),
            failed: None,
        };
    };
    let (pending, message) = match gate::evaluate(migration, &requirement) {
        Verdict::Satisfied => (false, "applied".to_string()),
        Verdict::Held { message, .. } => (true, message),
    };
    CheckRow {
        namespace,
        deployment: deployment.name_any(),
        migration: requirement.migration,
        required: Some(requirement.revision),
        applied,
        pending,
        message,
        rolled_out: rolled_out(deployment),
        failed: if pending { stalled(migration) } else { None },
    }
}

/// The rows as an aligned table, like kubectl prints.
pub fn render_table(rows: &[CheckRow]) -> String {
    let header = [
        "NAMESPACE",
        "DEPLOYMENT",
        "MIGRATION",
        "REQUIRED",
        "APPLIED",
        "STATUS",
        "MESSAGE",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.namespace.clone(),
                r.deployment.clone(),
                r.migration.clone(),
                r.required.clone().unwrap_or_else(|| "-".into()),
                r.applied.clone().unwrap_or_else(|| "-".into()),
                if r.pending { "Pending" } else { "Ready" }.to_string(),
                r.message.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |cols: Vec<&str>, out: &mut String| {
        let text: Vec<String> = cols
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i + 1 == cols.len() {
                    c.to_string()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        out.push_str(text.join("   ").trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in &cells {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![CheckRow {
            namespace: "prod".into(),
            deployment: "admin-dashboard".into(),
            migration: "app-db".into(),
            required: Some("0002".into()),
            applied: Some("0001".into()),
            pending: true,
            message: "needs revision 0002".into(),
            rolled_out: false,
            failed: None,
        }];
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE   DEPLOYMENT"));
        assert!(lines[1].contains("Pending"));
        assert_eq!(
            lines[0].find("DEPLOYMENT"),
            lines[1].find("admin-dashboard")
        );
    }
}
