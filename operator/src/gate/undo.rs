//! `schemagate undo`: what `kubectl rollout undo` does, for a Deployment schemagate holds.
//! kubectl refuses to roll back a paused Deployment; the on-call engineer whose migration
//! failed wants the serving version back as the Deployment's template. The previous
//! template is written back; the gate then releases the Deployment in the same request
//! when the revision that template needs is applied.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

/// The annotation the Deployment controller numbers ReplicaSets with.
const REVISION: &str = "deployment.kubernetes.io/revision";
/// The label the Deployment controller adds to a ReplicaSet's template.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// Rolls `name` back to the template of its ReplicaSet `to_revision`, or of the newest one
/// whose template differs from the Deployment's. Returns what was done, for a person.
pub async fn undo(
    client: &Client,
    namespace: &str,
    name: &str,
    to_revision: Option<u64>,
) -> Result<String, String> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let deployment = deployments
        .get_opt(name)
        .await
        .map_err(|e| format!("reading Deployment {namespace}/{name}: {e}"))?
        .ok_or_else(|| format!("Deployment {namespace}/{name} not found"))?;
    let current = deployment
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let uid = deployment.uid().unwrap_or_default();
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let mut history: Vec<(u64, ReplicaSet)> = replica_sets
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing ReplicaSets in {namespace}: {e}"))?
        .items
        .into_iter()
        .filter(|rs| rs.owner_references().iter().any(|o| o.uid == uid))
        .filter_map(|rs| {
            let revision = rs.annotations().get(REVISION)?.parse().ok()?;
            Some((revision, rs))
        })
        .collect();
    history.sort_by_key(|(revision, _)| std::cmp::Reverse(*revision));
    let without_hash = |template: &k8s_openapi::api::core::v1::PodTemplateSpec| {
        let mut template = template.clone();
        if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
            labels.remove(POD_TEMPLATE_HASH);
        }
        template
    };
    let target = history.iter().find_map(|(revision, rs)| {
        let template = without_hash(rs.spec.as_ref()?.template.as_ref()?);
        let wanted = match to_revision {
            Some(to) => *revision == to,
            None => template != current,
        };
        wanted.then_some((*revision, template))
    });
    let Some((revision, template)) = target else {
        return Err(match to_revision {
            Some(to) => format!("Deployment {namespace}/{name} has no revision {to}"),
            None => {
                format!("Deployment {namespace}/{name} has no earlier template to roll back to")
            }
        });
    };
    let patch = serde_json::json!([
        { "op": "test", "path": "/metadata/resourceVersion", "value": deployment.resource_version() },
        { "op": "replace", "path": "/spec/template", "value": template },
    ]);
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|e| format!("building the patch: {e}"))?;
    deployments
        .patch(
            name,
            &PatchParams::default(),
            &Patch::<Deployment>::Json(patch),
        )
        .await
        .map_err(|e| format!("rolling back Deployment {namespace}/{name}: {e}"))?;
    Ok(format!(
        "deployment.apps/{name} rolled back to the template of revision {revision}"
    ))
}
