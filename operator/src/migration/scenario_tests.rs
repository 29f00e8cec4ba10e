//! Scenario tests: one reconcile against kube's mock service, asserting the exact API calls
//! in order. Each ends with a timeout so that a missing call fails instead of hanging.

use crate::context::Context;
use crate::migration::reconcile_migration;
use crate::telemetry::Metrics;
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::runtime::reflector;
use schemagate_crds::DatabaseMigration;
use std::sync::Arc;
use std::time::Duration;
use tower_test::mock::{self, Handle};

const MIGRATION: &str = r#"
apiVersion: schemagate.dev/v1alpha1
kind: DatabaseMigration
metadata: { name: app-db, namespace: prod, uid: 1b4e28ba-2fa1-11d2-883f-0016d3cca427, generation: 1, resourceVersion: "5" }
spec:
  database:
    engine: postgres
    urlSecretRef: { name: app-db-url, key: url }
    tracking: { tool: alembic }
  migrator: { image: app:v2, command: [alembic, upgrade, head] }
  revision: "0002"
"#;

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn context() -> (Arc<Context>, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (store, _writer) = reflector::store::<DeserializeGuard<DatabaseMigration>>();
    let ctx = Context::new(client, store, Arc::new(Metrics::default()));
    (Arc::new(ctx), handle)
}

fn json(status: u16, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn not_found(what: &str) -> Response<Body> {
    json(
        404,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{what} not found")}),
    )
}

/// Answers the next request after checking its method and path.
async fn expect(
    handle: &mut ApiHandle,
    method: &str,
    path: &str,
    answer: impl FnOnce(serde_json::Value) -> Response<Body>,
) -> serde_json::Value {
    let (request, send) = handle.next_request().await.expect("a request");
    assert_eq!(request.method().as_str(), method, "{}", request.uri());
    assert!(
        request.uri().path() == path,
        "expected {method} {path}, got {}",
        request.uri()
    );
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    send.send_response(answer(body.clone()));
    body
}

/// After the Secret: the attempt's Job (none yet), other Jobs on the database, the
/// opted-in Deployments, and the image's revision-graph Job (none yet: it is created, as
/// it needs no database).
async fn expect_job_and_deployment_reads(handle: &mut ApiHandle) {
    let fixture = crate::testing::migration_from_yaml(MIGRATION);
    let job = crate::migration::job::job_name(&fixture);
    let graph_job = crate::migration::job::graph_job_name(&fixture);
    expect(
        handle,
        "GET",
        &format!("/apis/batch/v1/namespaces/prod/jobs/{job}"),
        |_| not_found("job"),
    )
    .await;
    // Other migration Jobs on the same database, in every namespace.
    expect(handle, "GET", "/apis/batch/v1/jobs", |_| {
        json(200, serde_json::json!({"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": []}))
    })
    .await;
    expect(handle, "GET", "/apis/apps/v1/namespaces/prod/deployments", |_| {
        json(200, serde_json::json!({"kind": "DeploymentList", "apiVersion": "apps/v1", "metadata": {}, "items": []}))
    })
    .await;
    expect(
        handle,
        "GET",
        &format!("/apis/batch/v1/namespaces/prod/jobs/{graph_job}"),
        |_| not_found("job"),
    )
    .await;
    let created = expect(
        handle,
        "POST",
        "/apis/batch/v1/namespaces/prod/jobs",
        |body| json(201, body),
    )
    .await;
    assert_eq!(created["metadata"]["name"], graph_job.as_str());
    let env = &created["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        !env.to_string().contains("DATABASE_URL"),
        "the graph Job never sees the database URL: {env}"
    );
}

fn migration() -> Arc<DeserializeGuard<DatabaseMigration>> {
    Arc::new(DeserializeGuard(Ok(crate::testing::migration_from_yaml(
        MIGRATION,
    ))))
}

#[tokio::test]
async fn missing_secret_sets_a_condition_and_a_warning_event() {
    let (ctx, mut handle) = context();
    let verifier = tokio::spawn(async move {
        expect(
            &mut handle,
            "GET",
            "/api/v1/namespaces/prod/secrets/app-db-url",
            |_| not_found("secret"),
        )
        .await;
        expect_job_and_deployment_reads(&mut handle).await;
        let status = expect(&mut handle, "PATCH", "/apis/schemagate.dev/v1alpha1/namespaces/prod/databasemigrations/app-db/status", |body| {
            json(200, serde_json::json!({"apiVersion": "schemagate.dev/v1alpha1", "kind": "DatabaseMigration", "metadata": {"name": "app-db", "namespace": "prod"}, "spec": serde_yaml::from_str::<serde_json::Value>(MIGRATION).unwrap()["spec"], "status": body["status"]}))
        })
        .await;
        let ready = status["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "SecretNotFound");
        assert_eq!(status["status"]["phase"], "Pending");
        let event = expect(
            &mut handle,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/prod/events",
            |body| json(201, body),
        )
        .await;
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "SecretNotFound");
        assert!(event["note"].as_str().unwrap().contains("app-db-url"));
    });
    let result = reconcile_migration(migration(), ctx).await;
    assert!(matches!(
        result,
        Err(crate::error::Error::SecretNotFound { .. })
    ));
    tokio::time::timeout(Duration::from_secs(1), verifier)
        .await
        .expect("every expected API call was made")
        .unwrap();
}

/// The Secret holds `url` (a database that does not answer); the reconcile reads the Jobs
/// and Deployments and writes a status, returned as the API server received it.
async fn unreachable_url_then_status(
    handle: &mut ApiHandle,
    url: &'static str,
) -> serde_json::Value {
    expect(handle, "GET", "/api/v1/namespaces/prod/secrets/app-db-url", move |_| {
        json(200, serde_json::json!({"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "app-db-url"}, "data": {"url": encode(url)}}))
    })
    .await;
    expect_job_and_deployment_reads(handle).await;
    expect(handle, "PATCH", "/apis/schemagate.dev/v1alpha1/namespaces/prod/databasemigrations/app-db/status", |body| json(200, serde_json::json!({"apiVersion": "schemagate.dev/v1alpha1", "kind": "DatabaseMigration", "metadata": {"name": "app-db"}, "spec": serde_yaml::from_str::<serde_json::Value>(MIGRATION).unwrap()["spec"], "status": body["status"]}))).await
}

#[tokio::test]
async fn unreachable_database_creates_no_job() {
    let (ctx, mut handle) = context();
    let verifier = tokio::spawn(async move {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let status =
            unreachable_url_then_status(&mut handle, "postgres://app:s3cret-pw@127.0.0.1:1/app")
                .await;
        let text = status.to_string();
        assert!(
            !text.contains("s3cret-pw"),
            "password leaked into status: {text}"
        );
        let event = expect(
            &mut handle,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/prod/events",
            |body| json(201, body),
        )
        .await;
        assert_eq!(event["type"], "Warning");
        assert!(
            !event.to_string().contains("s3cret-pw"),
            "password leaked into an Event"
        );
    });
    let result = reconcile_migration(migration(), ctx).await;
    assert!(result.is_err());
    tokio::time::timeout(Duration::from_secs(1), verifier)
        .await
        .expect("every expected API call was made")
        .unwrap();
}

/// A watch read the revision through the URL the Secret held then; the Secret now names
/// another database. The reading decides nothing: the database the Secret names is read
/// (here it is unreachable), and nothing is Ready.
#[tokio::test]
async fn a_watchs_reading_through_a_url_the_secret_no_longer_holds_decides_nothing() {
    let (ctx, mut handle) = context();
    let verifier = tokio::spawn(async move {
        let status =
            unreachable_url_then_status(&mut handle, "postgres://app:n3w-pw@127.0.0.1:1/app").await;
        let ready = status["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "DatabaseUnreachable");
    });
    let migration = crate::testing::migration_from_yaml(MIGRATION);
    let reading = crate::migration::observe::Reading {
        url: "postgres://app:old-pw@127.0.0.1:2/old".to_string(),
        applied: crate::probe::AppliedRevisions {
            revisions: vec!["0002".to_string()],
            head_only: true,
        },
        read_at: std::time::Instant::now(),
        confirmed: false,
    };
    let result = super::reconcile(&migration, &ctx, Some(reading)).await;
    assert!(
        result.is_err(),
        "the database the Secret names is unreachable"
    );
    tokio::time::timeout(Duration::from_secs(1), verifier)
        .await
        .expect("every expected API call was made")
        .unwrap();
}

fn encode(text: &str) -> String {
    serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec()))
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}
