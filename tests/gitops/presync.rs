//! The same release two ways, side by side in one run: with schemagate, and the way GitOps
//! teams do it without it, the migration as an Argo CD PreSync hook Job. Prints the
//! figures of docs/argocd.md ("schemagate or a PreSync hook").

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::ListParams;
use schemagate_testenv::harness::deployment_available;

use crate::argo::{Recorder, SyncMode};
use crate::releases::{GitOpsApp, SERVER_SIDE, describe, manifest, presync_job, v1_tree, v2_tree};
use crate::support::{
    APP_V1, APP_V2, BROKEN_V2, DEPLOYMENT, alembic_version, assert_safe_release, finish_watch,
    watch_release,
};

const MODE: SyncMode = SERVER_SIDE;

/// A PreSync hook Job migrating with `image` to `target`.
fn hook(image: &str, target: &str) -> String {
    presync_job("migrate", image, &["alembic", "upgrade", target])
}

/// The app without schemagate: the Deployment without the opt-in label.
fn ungated(manifest_text: &str) -> String {
    manifest_text.replace("    schemagate.dev/migration: app-db\n", "")
}

fn hook_v1() -> Vec<(&'static str, String)> {
    vec![
        ("app.yaml", ungated(&manifest("app-v1.yaml"))),
        ("hook.yaml", hook(APP_V1, "0001")),
    ]
}

fn hook_v2(image: &str) -> Vec<(&'static str, String)> {
    vec![
        ("app.yaml", ungated(&manifest("app-v2.yaml"))),
        ("hook.yaml", hook(image, "head")),
    ]
}

/// Times of one release through Git, from the push.
#[derive(Debug)]
struct Release {
    /// Push → Argo CD started the sync, with a refresh asked for right after the push as
    /// Argo CD's Git webhook does (without one, polling adds up to `timeout.reconciliation`
    /// plus the repo server's revision cache; see docs/argocd.md).
    noticed: Duration,
    /// Push → `alembic_version` said 0002.
    migrated: Duration,
    /// Push → v2 rolled out and Available.
    rolled_out: Duration,
    early_pods: usize,
}

/// Pushes `tree`, asks for a refresh, and waits for the rollout, timing each step.
async fn timed_release(gitops: &GitOpsApp, tree: &[(&str, String)]) -> Release {
    let (stop_pods, pods) = watch_release(&gitops.ns, gitops.url.clone(), "0001", "0002").await;
    let recorder = Recorder::start(&gitops.app).await;
    let url = gitops.url.clone();
    let (commit, pushed) = gitops.repo.push("release v2", tree).await;
    gitops.app.refresh().await;
    let migrated = tokio::spawn(async move {
        loop {
            if alembic_version(&url).await.as_deref() == Some("0002") {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    gitops.app.synced_healthy(&commit).await;
    deployment_available(&gitops.ns.api(), DEPLOYMENT, Duration::from_secs(120)).await;
    let rolled_out = pushed.elapsed();
    let migrated = migrated.await.expect("the database poll");
    let states = recorder.finish().await;
    let noticed = states
        .iter()
        .find(|(_, s)| s.operation_revision == commit)
        .map(|(at, _)| at.duration_since(pushed))
        .expect("the sync of the commit was seen");
    let timeline = finish_watch(stop_pods, pods).await;
    assert_safe_release(&timeline);
    Release {
        noticed,
        migrated: migrated.duration_since(pushed),
        rolled_out,
        early_pods: timeline.early_pods,
    }
}

/// Scales the Deployment by hand (drift); self-heal syncs it back. Returns the number of
/// migration Jobs created by that sync.
async fn self_heal(gitops: &GitOpsApp) -> usize {
    let jobs_before = job_uids(gitops).await;
    let before = gitops.app.state().await.operation_started_at;
    let output = gitops
        .ns
        .cluster()
        .kubectl([
            "-n",
            gitops.ns.name(),
            "scale",
            "deployment",
            DEPLOYMENT,
            "--replicas=3",
        ])
        .await;
    assert!(output.status.success(), "kubectl scale: {output:?}");
    gitops.app.refresh().await;
    let healed = gitops
        .app
        .wait("self-healed", |s| {
            s.operation_started_at != before
                && s.operation_phase == "Succeeded"
                && s.sync == "Synced"
        })
        .await;
    deployment_available(&gitops.ns.api(), DEPLOYMENT, Duration::from_secs(120)).await;
    let replicas = gitops.deployment().await.spec.and_then(|s| s.replicas);
    assert_eq!(
        replicas,
        Some(2),
        "self-heal restored Git's replicas: {healed:#?}"
    );
    job_uids(gitops)
        .await
        .iter()
        .filter(|uid| !jobs_before.contains(uid))
        .count()
}

/// How many pods the migration hook's Jobs have started (from their Events: a hook Job is
/// deleted before the next one is created).
async fn hook_runs(gitops: &GitOpsApp) -> usize {
    crate::support::events_for(&gitops.ns, "migrate")
        .await
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SuccessfulCreate"))
        .count()
}

/// Pushes `tree` plus an unrelated ConfigMap (a commit that changes no code and no
/// schema) and returns the number of Jobs its sync created.
async fn unrelated_commit(gitops: &GitOpsApp, tree: &[(&'static str, String)]) -> usize {
    let jobs_before = job_uids(gitops).await;
    let mut files = tree.to_vec();
    files.push((
        "notes.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: release-notes\ndata:\n  v2: uploads\n"
            .to_owned(),
    ));
    let commit = gitops.release("add release notes", &files).await;
    gitops.app.synced_healthy(&commit).await;
    job_uids(gitops)
        .await
        .iter()
        .filter(|uid| !jobs_before.contains(uid))
        .count()
}

async fn job_uids(gitops: &GitOpsApp) -> Vec<String> {
    gitops
        .ns
        .api::<Job>()
        .list(&ListParams::default())
        .await
        .expect("listing Jobs")
        .items
        .iter()
        .filter_map(|j| j.uid())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn schemagate_and_a_presync_hook_side_by_side() {
    // With schemagate.
    let gated = GitOpsApp::start("gitops-compare-schemagate", MODE, true, v1_tree()).await;
    let with_schemagate = timed_release(&gated, &v2_tree()).await;
    let schemagate_heal_jobs = self_heal(&gated).await;
    let schemagate_unrelated_jobs = unrelated_commit(&gated, &v2_tree()).await;

    // Without: the migration as a PreSync hook.
    let hooked = GitOpsApp::start("gitops-compare-presync", MODE, false, hook_v1()).await;
    let with_hook = timed_release(&hooked, &hook_v2(APP_V2)).await;
    let hook_heal_jobs = self_heal(&hooked).await;
    let hook_unrelated_jobs = unrelated_commit(&hooked, &hook_v2(APP_V2)).await;

    // A failing migration as a PreSync hook: the sync fails before the Deployment is
    // applied and v1 serves; automated sync retries the operation (5 times by default,
    // backing off from 5 s).
    let failing = GitOpsApp::start("gitops-compare-presync-fail", MODE, false, hook_v1()).await;
    let runs_before = hook_runs(&failing).await;
    let broken = failing.release("release v2", &hook_v2(BROKEN_V2)).await;
    let retrying = failing
        .app
        .wait("retrying the failed sync a second time", |s| {
            s.operation_revision == broken && s.operation_message.contains("Retrying attempt #2")
        })
        .await;
    assert_eq!(
        failing.template_image().await,
        APP_V1,
        "v2 was never applied"
    );
    let failed_runs = hook_runs(&failing).await - runs_before;
    assert!(failed_runs >= 1, "the hook ran for the failed commit");

    assert_eq!(schemagate_heal_jobs, 0, "self-heal re-ran no migration");
    // Argo CD's self-heal syncs only the drifted resources, and a partial sync runs no
    // hooks; every full sync (any new commit) runs the PreSync hook again.
    assert_eq!(hook_heal_jobs, 0, "self-heal syncs run no hooks");
    assert_eq!(
        schemagate_unrelated_jobs, 0,
        "an unrelated commit runs no migration"
    );
    assert_eq!(hook_unrelated_jobs, 1, "the hook runs on every full sync");
    let row = |name: &str, r: &Release, heal: usize, unrelated: usize| {
        format!(
            "| {name} | {:.1} s | {:.1} s | {:.1} s | {} | {heal} | {unrelated} |",
            r.noticed.as_secs_f64(),
            r.migrated.as_secs_f64(),
            r.rolled_out.as_secs_f64(),
            r.early_pods
        )
    };
    eprintln!(
        "gitops figures (push → Argo CD's sync started, → 0002 in the database, → v2 rolled out; early v2 pods; migration Jobs of a self-heal sync; of an unrelated commit)\n{}\n{}\nfailing PreSync hook: {} (hook pods for the failed commit so far: {failed_runs})",
        row(
            "schemagate",
            &with_schemagate,
            schemagate_heal_jobs,
            schemagate_unrelated_jobs
        ),
        row(
            "PreSync hook",
            &with_hook,
            hook_heal_jobs,
            hook_unrelated_jobs
        ),
        describe(&retrying)
    );
}
