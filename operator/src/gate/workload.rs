//! What the gate holds, behind one small abstraction. A Deployment is held through
//! `spec.paused`; another kind is one more implementation here (a StatefulSet through its
//! update partition, a CronJob through `suspend`) plus a line of wiring in
//! `crate::controller` and a rule in the webhook configuration.

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;

/// A workload kind whose rollout the gate can hold.
pub trait Workload:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// The pod template's annotations, where `schemagate.dev/revision` travels.
    fn template_annotations(&self) -> Option<&BTreeMap<String, String>>;

    /// Whether its rollout is stopped now (by schemagate or by a person).
    fn rollout_stopped(&self) -> bool;

    /// Whether `other` has the same pod template: an update between the two starts no
    /// rollout.
    fn same_template(&self, other: &Self) -> bool;

    /// The `spec` of a JSON merge patch that stops (`true`) or resumes its rollout.
    fn merge_spec(stop: bool) -> serde_json::Value;

    /// The RFC 6902 operation that does the same, for the admission webhook.
    fn json_operation(stop: bool) -> serde_json::Value;
}

impl Workload for Deployment {
    fn template_annotations(&self) -> Option<&BTreeMap<String, String>> {
        self.spec
            .as_ref()?
            .template
            .metadata
            .as_ref()?
            .annotations
            .as_ref()
    }

    fn rollout_stopped(&self) -> bool {
        self.spec.as_ref().and_then(|s| s.paused) == Some(true)
    }

    fn same_template(&self, other: &Self) -> bool {
        self.spec.as_ref().map(|s| &s.template) == other.spec.as_ref().map(|s| &s.template)
    }

    fn merge_spec(stop: bool) -> serde_json::Value {
        serde_json::json!({ "paused": stop })
    }

    fn json_operation(stop: bool) -> serde_json::Value {
        serde_json::json!({"op": "add", "path": "/spec/paused", "value": stop})
    }
}
