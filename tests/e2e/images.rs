//! Pods from OCI images: the test node runs a container inside the root filesystem of an
//! OCI layout, as the user the pod and the image ask for, with the pod's volumes, and with
//! a read-only root when `readOnlyRootFilesystem` says so. A user it cannot run as fails
//! the pod with the kubelet's reason and message.
//!
//! The image here is made by the test with `umoci` (Debian package): `dash` as `/bin/sh`
//! and the libraries it links, nothing else. The operator's own image is run by the chart
//! test (`chart.rs`).

use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use schemagate_testenv::harness::{TestNamespace, namespace, wait_for};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const IMAGE: &str = "registry.example/tiny-shell";

fn run(command: &mut Command) {
    let output = command.output().expect("running a command");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An OCI layout with one root filesystem (`/bin/sh` = dash, its libraries, an
/// `/etc/passwd` naming `nonroot` 65532, `/tmp` writable by anyone) under three tags: `numeric` (user 65532:65532),
/// `named` (user `nonroot`) and `root` (no user). Built once per test binary.
fn layout() -> &'static Path {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("schemagate-e2e-oci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory");
        let layout = dir.join("layout");
        let bundle = dir.join("bundle");
        run(Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout));
        run(Command::new("umoci")
            .args(["new", "--image"])
            .arg(format!("{}:root", layout.display())));
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:root", layout.display()))
            .arg(&bundle));
        let rootfs = bundle.join("rootfs");
        let shell = std::fs::canonicalize("/bin/sh").expect("/bin/sh");
        let mut files = vec![(shell.clone(), PathBuf::from("bin/sh"))];
        let ldd = Command::new("ldd").arg(&shell).output().expect("ldd");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let path = line
                .split_whitespace()
                .find(|word| word.starts_with('/'))
                .map(PathBuf::from);
            if let Some(path) = path {
                let inside = path.strip_prefix("/").expect("absolute").to_path_buf();
                files.push((path, inside));
            }
        }
        for (from, to) in files {
            let to = rootfs.join(to);
            std::fs::create_dir_all(to.parent().expect("a parent")).expect("a directory");
            std::fs::copy(&from, &to).expect("copying into the image");
        }
        std::fs::create_dir_all(rootfs.join("etc")).expect("etc");
        std::fs::create_dir_all(rootfs.join("tmp")).expect("tmp");
        std::fs::set_permissions(
            rootfs.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .expect("tmp for anyone");
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/:/bin/sh\nnonroot:x:65532:65532:nonroot:/:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n").expect("group");
        run(Command::new("umoci")
            .args(["repack", "--image"])
            .arg(format!("{}:root", layout.display()))
            .arg(&bundle));
        for (tag, user) in [
            ("root", ""),
            ("numeric", "65532:65532"),
            ("named", "nonroot"),
        ] {
            run(Command::new("umoci")
                .args(["config", "--image"])
                .arg(format!("{}:root", layout.display()))
                .args(["--tag", tag, "--config.user", user])
                .args(["--config.entrypoint", "/bin/sh"]));
        }
        layout
    })
}

async fn register(ns: &TestNamespace, tag: &str) -> String {
    let image = format!("{IMAGE}:{tag}");
    ns.cluster()
        .register_oci_image(&image, &format!("{}:{tag}", layout().display()))
        .await;
    image
}

/// A pod of `image` that runs `script` with `/bin/sh -c`, an emptyDir at `/out`, and the
/// security context `security` on its container.
fn pod(name: &str, image: &str, script: &str, security: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": true},
            "containers": [{
                "name": "main",
                "image": image,
                "args": ["-c", script],
                "securityContext": security,
                "volumeMounts": [{"name": "out", "mountPath": "/out"}],
            }],
            "volumes": [{"name": "out", "emptyDir": {}}],
        },
    }))
    .expect("a pod")
}

async fn finished(ns: &TestNamespace, name: &str) -> Pod {
    wait_for(
        &ns.api::<Pod>(),
        name,
        Duration::from_secs(60),
        "the pod finished",
        |pod: &Pod| {
            matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        },
    )
    .await
}

fn terminated(pod: &Pod) -> (Option<String>, Option<String>, i32) {
    let state = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.clone())
        .expect("a terminated container");
    (state.reason, state.message, state.exit_code)
}

#[tokio::test]
async fn a_pod_runs_inside_its_image_as_its_user_on_a_read_only_root() {
    let ns = namespace("oci-run").await;
    let image = register(&ns, "numeric").await;
    // Only shell built-ins: the image has nothing else.
    let script = r#"
        while read -r key value rest; do
            [ "$key" = "Uid:" ] && uid=$value
        done < /proc/self/status
        if ( : > /tmp/written ) 2>/dev/null; then root=writable; else root=read-only; fi
        if ( : > /out/written ) 2>/dev/null; then out=writable; else out=read-only; fi
        if [ -e /usr/bin/python3 ] || [ -e /etc/os-release ]; then host=visible; else host=hidden; fi
        echo "uid=$uid root=$root out=$out host=$host" > /dev/termination-log
    "#;
    let api = ns.api::<Pod>();
    api.create(
        &PostParams::default(),
        &pod(
            "as-image-user",
            &image,
            script,
            serde_json::json!({"readOnlyRootFilesystem": true}),
        ),
    )
    .await
    .expect("creating the pod");
    let done = finished(&ns, "as-image-user").await;
    let (reason, message, code) = terminated(&done);
    assert_eq!(
        (reason.as_deref(), code),
        (Some("Completed"), 0),
        "{message:?}"
    );
    assert_eq!(
        message.as_deref().map(str::trim),
        Some("uid=65532 root=read-only out=writable host=hidden"),
        "the image's user, the image's files only, a read-only root, a writable emptyDir"
    );

    // The pod's runAsUser wins over the image's user; without readOnlyRootFilesystem the
    // root is writable (the container's own copy).
    api.create(
        &PostParams::default(),
        &pod(
            "as-pod-user",
            &image,
            script,
            serde_json::json!({"runAsUser": 1000, "runAsGroup": 1000}),
        ),
    )
    .await
    .expect("creating the pod");
    let done = finished(&ns, "as-pod-user").await;
    let (_, message, code) = terminated(&done);
    assert_eq!(code, 0, "{message:?}");
    assert_eq!(
        message.as_deref().map(str::trim),
        Some("uid=1000 root=writable out=writable host=hidden"),
        "the pod's user; the image's /tmp written in the container's own copy of the root"
    );
}

#[tokio::test]
async fn a_user_the_pod_cannot_run_as_fails_it_with_the_kubelets_reason() {
    let ns = namespace("oci-user").await;
    let api = ns.api::<Pod>();
    for (tag, name, expected) in [
        (
            "named",
            "named-user",
            "container has runAsNonRoot and image has non-numeric user (nonroot), cannot verify user is non-root",
        ),
        (
            "root",
            "root-user",
            "container has runAsNonRoot and image will run as root",
        ),
    ] {
        let image = register(&ns, tag).await;
        api.create(
            &PostParams::default(),
            &pod(name, &image, "exit 0", serde_json::json!({})),
        )
        .await
        .expect("creating the pod");
        let done = finished(&ns, name).await;
        let (reason, message, _) = terminated(&done);
        assert_eq!(reason.as_deref(), Some("CreateContainerConfigError"));
        let message = message.unwrap_or_default();
        assert!(
            message.starts_with(expected) && message.contains("container: main"),
            "{message}"
        );
    }
}
