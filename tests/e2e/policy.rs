//! Who may run what: the chart's optional ValidatingAdmissionPolicy limits migrator
//! images, ServiceAccounts and custom queries per namespace; a migration Job that
//! admission refuses ends in a condition and an Event that say so, and is tried again.

use crate::support::*;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use schemagate_crds::DatabaseMigration;
use schemagate_testenv::harness::{TestNamespace, namespace};
use std::time::{Duration, Instant};

/// How long the API server may take to start enforcing a new policy.
const POLICY_ACTIVE_WITHIN: Duration = Duration::from_secs(30);

fn cluster_scoped(ns: &TestNamespace, kind: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "admissionregistration.k8s.io",
        "v1",
        kind,
    ));
    Api::all_with(ns.cluster().client(), &resource)
}

async fn apply(ns: &TestNamespace, object: &serde_json::Value) {
    let kind = object["kind"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let api = match object["metadata"]["namespace"].as_str() {
        Some(namespace) => {
            let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", kind));
            Api::namespaced_with(ns.cluster().client(), namespace, &resource)
        }
        None => cluster_scoped(ns, kind),
    };
    api.patch(
        name,
        &PatchParams::apply("schemagate-e2e").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
}

async fn delete_policy(ns: &TestNamespace, name: &str) {
    for kind in [
        "ValidatingAdmissionPolicyBinding",
        "ValidatingAdmissionPolicy",
    ] {
        let _ = cluster_scoped(ns, kind)
            .delete(name, &DeleteParams::default())
            .await;
    }
}

/// A DatabaseMigration with this migrator image, ServiceAccount and tracking.
fn migration(image: &str, account: Option<&str>, tracking: &str) -> DatabaseMigration {
    let yaml = app_db_yaml(
        tracking,
        image,
        r#"["alembic", "upgrade", "head"]"#,
        "0002",
        "",
    );
    let mut migration: DatabaseMigration =
        serde_yaml::from_str(&yaml).expect("a DatabaseMigration");
    migration.spec.migrator.service_account_name = account.map(str::to_owned);
    migration
}

/// Dry-run creates `migration`; the API server's refusal, if any.
async fn refusal(ns: &TestNamespace, migration: &DatabaseMigration) -> Option<String> {
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match ns
        .api::<DatabaseMigration>()
        .create(&params, migration)
        .await
    {
        Ok(_) => None,
        Err(kube::Error::Api(status)) => Some(status.message),
        Err(error) => panic!("creating the DatabaseMigration: {error}"),
    }
}

#[tokio::test]
async fn the_chart_admission_policy_limits_images_accounts_and_queries_per_namespace() {
    let ns = namespace("admission-policy").await;
    prepare(ns.cluster()).await;
    let name = ns.name();
    // Default rules for every namespace; this namespace's own image rule replaces the
    // default one.
    let rendered = rendered_chart_with(
        name,
        &[
            "admissionPolicy.enabled=true",
            "admissionPolicy.default.allowedImagePrefixes={registry.example/other/}",
            "admissionPolicy.default.allowedServiceAccounts={default,migrator}",
            "admissionPolicy.default.allowCustomQueries=false",
            &format!("admissionPolicy.namespaces.{name}.allowedImagePrefixes={{registry.example/admin-dashboard:}}"),
        ],
    )
    .await;
    let policy = format!("{}-migrations", chart_fullname(name));
    for object in &rendered {
        if object["metadata"]["name"] == policy.as_str() {
            let mut object = object.clone();
            if object["kind"] == "ConfigMap" {
                // `helm template` leaves the release namespace to the client.
                object["metadata"]["namespace"] = name.into();
            }
            apply(&ns, &object).await;
        }
    }
    let tool = "{ tool: alembic }";
    let denied_image = migration("registry.example/other-team:v1", None, tool);
    let deadline = Instant::now() + POLICY_ACTIVE_WITHIN;
    let message = loop {
        if let Some(message) = refusal(&ns, &denied_image).await {
            break message;
        }
        assert!(Instant::now() < deadline, "the policy was never enforced");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        message.contains("spec.migrator.image registry.example/other-team:v1 is not allowed")
            && message.contains("registry.example/admin-dashboard:"),
        "{message}"
    );
    // The namespace's rule replaced the default: the default prefix is refused here.
    let default_prefix = migration("registry.example/other/app:v1", None, tool);
    assert!(refusal(&ns, &default_prefix).await.is_some());

    let account = refusal(&ns, &migration(APP_V2, Some("cluster-admin-ish"), tool))
        .await
        .expect("an unlisted ServiceAccount is refused");
    assert!(
        account.contains("serviceAccountName cluster-admin-ish is not allowed"),
        "{account}"
    );
    let query = refusal(
        &ns,
        &migration(
            APP_V2,
            None,
            "{ query: \"SELECT version_num FROM alembic_version\" }",
        ),
    )
    .await
    .expect("a custom query is refused");
    assert!(
        query.contains("spec.database.tracking.query is not allowed"),
        "{query}"
    );

    assert_eq!(refusal(&ns, &migration(APP_V2, None, tool)).await, None);
    assert_eq!(
        refusal(&ns, &migration(APP_V2, Some("migrator"), tool)).await,
        None
    );
    delete_policy(&ns, &policy).await;
}

/// An admission policy of the cluster's own refuses the migration Job: the
/// DatabaseMigration is Stalled with the policy's message and a Warning Event, and the
/// Job is created once the policy allows it, without anyone touching the resource.
#[tokio::test]
async fn a_migration_job_refused_by_admission_is_reported_and_tried_again() {
    let ns = namespace("job-refused").await;
    let operator = Operator::start(&ns, OperatorOptions::backstop_only()).await;
    let url = create_postgres_database(ns.cluster(), "pw-refused-2231").await;
    url_secret(&ns, "app-db-url", "url", &url).await;
    let policy = format!("freeze-{}", ns.name());
    apply(
        &ns,
        &serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": ["batch"], "apiVersions": ["v1"],
                    "operations": ["CREATE"], "resources": ["jobs"]
                }]},
                "validations": [{
                    "expression": "!has(object.metadata.labels) || object.metadata.labels[?'schemagate.dev/purpose'].orValue('') != 'migration'",
                    "message": "migration Jobs are frozen in this namespace until the release window"
                }]
            }
        }),
    )
    .await;
    apply(
        &ns,
        &serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {
                "policyName": policy,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name()}}}
            }
        }),
    )
    .await;
    // Enforced once a labelled Job is refused.
    let probe: Job = serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "probe", "labels": {"schemagate.dev/purpose": "migration"}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "none"}]}}}
    }))
    .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + POLICY_ACTIVE_WITHIN;
    while ns.api::<Job>().create(&dry_run, &probe).await.is_ok() {
        assert!(Instant::now() < deadline, "the policy was never enforced");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    apply_migration(
        &ns,
        &app_db_yaml(
            "{ tool: alembic }",
            APP_V1,
            r#"["alembic", "upgrade", "0001"]"#,
            "0001",
            "",
        ),
    )
    .await;
    let stalled = await_app_db_condition(&ns, "Stalled", "True", "JobRejected").await;
    let message = &condition(&stalled, "Stalled").unwrap().message;
    assert!(message.contains("frozen in this namespace"), "{message}");
    assert!(message.contains("refused to create Job"), "{message}");
    assert_eq!(condition(&stalled, "Ready").unwrap().reason, "JobRejected");
    let event = await_event(&ns, "app-db", "Warning", "JobRejected").await;
    assert!(event.note.unwrap_or_default().contains("frozen"));

    delete_policy(&ns, &policy).await;
    await_ready(&ns).await;
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0001"));
    assert_no_password(&ns, "pw-refused-2231", Some(&operator)).await;
}

/// What the API server answers for the operator's ServiceAccount (the chart's RBAC).
async fn operator_can(ns: &TestNamespace, verb: &str, resource: &str, namespace: &str) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!(
                "system:serviceaccount:{}:{}",
                ns.name(),
                chart_fullname(ns.name())
            )),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", ns.name()),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some(verb.to_owned()),
                resource: Some(resource.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SubjectAccessReview>::all(ns.cluster().client())
        .create(&PostParams::default(), &review)
        .await
        .expect("a SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

/// `kubectl auth can-i list secrets` as the operator: no, in every namespace, and no
/// watch either; it reads a Secret only by name, where it serves.
#[tokio::test]
async fn the_operator_cannot_list_or_watch_secrets_anywhere() {
    let ns = namespace("secrets-rbac").await;
    let operator = Operator::start(&ns, OperatorOptions::backstop_only()).await;
    for namespace in [ns.name(), "default", "kube-system", ""] {
        for verb in ["list", "watch"] {
            assert!(
                !operator_can(&ns, verb, "secrets", namespace).await,
                "{verb} secrets in {namespace:?}"
            );
        }
    }
    assert!(
        operator_can(&ns, "get", "secrets", ns.name()).await,
        "the check is meaningful: it reads a named Secret where it serves"
    );
    assert!(!operator_can(&ns, "get", "secrets", "kube-system").await);
    operator.stop().await;
}
