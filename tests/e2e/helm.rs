//! An application released with Helm 3 and Helm 4 (examples/helm/admin-dashboard: the
//! Deployment and its DatabaseMigration in one chart), as docs/helm.md describes it: what
//! `--wait` waits for, a held release re-applied, a rollback while held, and the release
//! followed by `schemagate check --wait`.

use crate::support::*;
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use schemagate_crds::{DatabaseMigration, HELD_FOR_ANNOTATION};
use schemagate_testenv::harness::{TestNamespace, deployment_available, namespace, wait_for};

const RELEASE: &str = "admin-dashboard";

struct Helm<'a> {
    bin: String,
    ns: &'a TestNamespace,
}

impl Helm<'_> {
    async fn run(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(&self.bin)
            .args(args)
            .args(["--namespace", self.ns.name()])
            .current_dir(repo_root())
            .env("KUBECONFIG", self.ns.cluster().kubeconfig_path())
            .output()
            .await
            .expect("running helm")
    }

    async fn upgrade(&self, values: &[&str], wait: bool) -> std::process::Output {
        let mut args = vec![
            "upgrade",
            "--install",
            RELEASE,
            "examples/helm/admin-dashboard",
        ];
        for value in values {
            args.extend(["--set", value]);
        }
        if wait {
            args.extend(["--wait", "--timeout", "40s"]);
        }
        self.run(&args).await
    }
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn check_wait(ns: &TestNamespace) -> std::process::Output {
    tokio::process::Command::new(schemagate_bin())
        .args(["check", "-n", ns.name(), "--wait", "--timeout", "110s"])
        .env("KUBECONFIG", ns.cluster().kubeconfig_path())
        .output()
        .await
        .expect("running schemagate check --wait")
}

fn held_for(deployment: &Deployment) -> Option<&str> {
    deployment
        .annotations()
        .get(HELD_FOR_ANNOTATION)
        .map(String::as_str)
}

async fn helm_release_flow(major: u8) {
    let ns = namespace(&format!("helm{major}")).await;
    let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    prepare(ns.cluster()).await;
    let url = create_postgres_database(ns.cluster(), "pw-helm-2718").await;
    url_secret(&ns, "app-db-url", "url", &url).await;
    let helm = Helm {
        bin: helm_bin_of(major).await,
        ns: &ns,
    };

    // v1 and its migration, installed together.
    let v1 = ["version=v1", "revision=0001"];
    let install = helm.upgrade(&v1, true).await;
    assert!(install.status.success(), "helm install: {}", text(&install));
    let check = check_wait(&ns).await;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0001"));

    // v2 whose migration fails: Helm 3 --wait succeeds while v2 is held (a paused
    // Deployment counts as ready, the DatabaseMigration is not looked at); Helm 4 --wait
    // reports the stalled DatabaseMigration.
    let broken = [
        "version=v2",
        "revision=0002",
        "migrator.image=registry.example/admin-dashboard:v2-broken",
    ];
    let upgrade = helm.upgrade(&broken, true).await;
    match major {
        3 => assert!(upgrade.status.success(), "Helm 3: {}", text(&upgrade)),
        _ => assert!(
            !upgrade.status.success(),
            "Helm 4 reports it: {}",
            text(&upgrade)
        ),
    }
    let migrations = ns.api::<DatabaseMigration>();
    let db = format!("{RELEASE}-db");
    wait_for(&migrations, &db, TIMEOUT, "Failed", |m| {
        has_condition(m, "Failed", "True", "MigrationFailed")
    })
    .await;
    let deployments = ns.api::<Deployment>();
    let held = deployments.get(RELEASE).await.unwrap();
    assert_eq!(held_for(&held), Some("0002"), "v2 held");
    assert_eq!(held.status.unwrap().ready_replicas, Some(2), "v1 serving");

    // The same release applied again (Helm 3: three-way merge; Helm 4: server-side
    // apply): still held, and no field-ownership conflict.
    let again = helm.upgrade(&broken, false).await;
    assert!(again.status.success(), "re-applied: {}", text(&again));
    let still = deployments.get(RELEASE).await.unwrap();
    assert_eq!(held_for(&still), Some("0002"), "still held after re-apply");
    assert_eq!(still.spec.unwrap().paused, Some(true));

    // helm rollback while v2 is held: v1's template needs 0001, which is applied, so the
    // Deployment is released at once and v1 goes on serving.
    let rollback = helm
        .run(&["rollback", RELEASE, "1", "--wait", "--timeout", "60s"])
        .await;
    assert!(rollback.status.success(), "rollback: {}", text(&rollback));
    let back = wait_for(
        &deployments,
        RELEASE,
        TIMEOUT,
        "released after rollback",
        |d| held_for(d).is_none() && d.spec.as_ref().and_then(|s| s.paused) != Some(true),
    )
    .await;
    let annotations = back
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap();
    assert_eq!(
        annotations
            .get("schemagate.dev/revision")
            .map(String::as_str),
        Some("0001")
    );
    deployment_available(&deployments, RELEASE, TIMEOUT).await;
    wait_for(&migrations, &db, TIMEOUT, "Ready at 0001 again", |m| {
        has_condition(m, "Ready", "True", "RevisionApplied")
            && m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation
    })
    .await;

    // The good v2: `helm upgrade --wait` then `schemagate check --wait`. No v2 pod before
    // 0002 is in the database; it ends with v2 rolled out.
    let (stop, watch) = watch_release(&ns, url.clone(), "0001", "0002").await;
    let good = helm.upgrade(&["version=v2", "revision=0002"], true).await;
    assert!(good.status.success(), "good v2: {}", text(&good));
    if major == 4 {
        // Helm 4 waited for the DatabaseMigration (kstatus): it is Ready by now.
        let migration = migrations.get(&db).await.unwrap();
        assert!(
            has_condition(&migration, "Ready", "True", "RevisionApplied"),
            "{:?}",
            migration.status
        );
    }
    let check = check_wait(&ns).await;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    let timeline = finish_watch(stop, watch).await;
    assert_eq!(timeline.early_pods, 0, "{timeline:?}");
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
}

#[tokio::test]
async fn helm3_release_waits_holds_reapplies_and_rolls_back() {
    helm_release_flow(3).await;
}

#[tokio::test]
async fn helm4_release_waits_holds_reapplies_and_rolls_back() {
    helm_release_flow(4).await;
}
