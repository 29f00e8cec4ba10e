#!/usr/bin/env bash
# The incident, replayed on the local control plane: v1 serving, v2 applied together with
# its migration in one `kubectl apply`, v2 held while the migration Job runs, revision 0002
# read from the database, v2 rolled out. Leaves everything running (unless
# SCHEMAGATE_DEMO_EXIT=1) and prints the kubeconfig. `make demo-down` stops it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-target}
demo=$target/demo
bin=$target/debug
ns=incident
mkdir -p "$demo"

t0=$(date +%s.%N)
say() { printf '\n\033[1m[%5.1fs] %s\033[0m\n' "$(awk -v now="$(date +%s.%N)" -v start="$t0" 'BEGIN { print now - start }')" "$*"; }
note() { printf '         %s\n' "$*"; }

# Stop a previous demo, then start the control plane, test node and PostgreSQL.
"$root/examples/incident/demo-down.sh" >/dev/null 2>&1 || true
say "Starting the local control plane (kube-apiserver, controller-manager, etcd), test node and PostgreSQL"
rm -f "$demo/ready"
nohup "$bin/schemagate-cluster" up --dir "$demo" --databases postgres </dev/null >"$demo/cluster.log" 2>&1 &
echo $! > "$demo/pid"
until [ -f "$demo/ready" ]; do
  kill -0 "$(cat "$demo/pid")" 2>/dev/null || { tail -40 "$demo/cluster.log"; exit 1; }
  sleep 0.3
done
# shellcheck disable=SC1091
source "$demo/cluster.env"
kubectl() { "$K8S_BIN" kubectl "$@"; }
note "kubeconfig: $KUBECONFIG"

say "Installing schemagate: CRD, ServiceAccount with its RBAC, webhook configuration, operator"
"$bin/schemagate" crd | kubectl apply -f - >/dev/null
kubectl wait --for=condition=Established crd/databasemigrations.schemagate.dev --timeout=60s >/dev/null
kubectl create namespace schemagate-system >/dev/null
kubectl -n schemagate-system create serviceaccount schemagate >/dev/null
# The chart's ClusterRole, rendered without Helm: the same rules the operator runs with in a cluster.
kubectl apply -f "$root/examples/incident/demo-rbac.yaml" >/dev/null
webhook_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed "s/WEBHOOK_PORT/$webhook_port/" "$root/examples/incident/demo-webhook.yaml" | kubectl apply -f - >/dev/null
token=$(kubectl -n schemagate-system create token schemagate --duration=24h)
ca=$(sed -n 's/^ *certificate-authority-data: //p' "$KUBECONFIG" | head -1)
cat > "$demo/operator.kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "$KUBERNETES_API_URL", certificate-authority-data: "$ca"}}]
users: [{name: schemagate, user: {token: "$token"}}]
contexts: [{name: schemagate, context: {cluster: local, user: schemagate}}]
current-context: schemagate
KCFG
KUBECONFIG=$demo/operator.kubeconfig POD_NAMESPACE=schemagate-system nohup "$bin/schemagate" run \
  --webhook-addr "127.0.0.1:$webhook_port" --webhook-cert-ip 127.0.0.1 \
  --webhook-config-name schemagate --webhook-cert-secret schemagate-webhook-cert \
  --metrics-addr "127.0.0.1:$metrics_port" \
  </dev/null >"$demo/operator.log" 2>&1 &
echo $! > "$demo/operator.pid"
until curl -sf "http://127.0.0.1:$metrics_port/readyz" >/dev/null; do
  kill -0 "$(cat "$demo/operator.pid")" 2>/dev/null || { tail -40 "$demo/operator.log"; exit 1; }
  sleep 0.2
done
note "operator ready; log: $demo/operator.log, metrics: http://127.0.0.1:$metrics_port/metrics"

# The app "images": the test node runs them from this directory (the image map).
for tag in v1 v2; do
  kubectl -n schemagate-test-images apply -f - >/dev/null <<CM
apiVersion: v1
kind: ConfigMap
metadata: {name: demo-admin-dashboard-$tag, labels: {schemagate.dev/test-image: "true"}}
data: {image: "registry.example/admin-dashboard:$tag", dir: "$root/examples/incident/app"}
CM
done

say "A database for the admin dashboard, and its URL in a Secret"
password=demo-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
psql -q "$POSTGRES_ADMIN_URL" -c "CREATE USER dashboard PASSWORD '$password'" -c "CREATE DATABASE dashboard OWNER dashboard"
pg_port=$(echo "$POSTGRES_ADMIN_URL" | sed -E 's#.*:([0-9]+)/.*#\1#')
db_url="postgres://dashboard:$password@127.0.0.1:$pg_port/dashboard"
kubectl create namespace $ns >/dev/null
kubectl -n $ns create secret generic app-db-url --from-literal=url="$db_url" >/dev/null

say "v1: migration to 0001, then the v1 Deployment (2 replicas)"
kubectl -n $ns apply -f examples/incident/manifests/migration-v1.yaml >/dev/null
kubectl -n $ns wait --for=condition=Ready dbm/app-db --timeout=120s >/dev/null
kubectl -n $ns apply -f examples/incident/manifests/app-v1.yaml >/dev/null
kubectl -n $ns rollout status deploy/admin-dashboard --timeout=120s >/dev/null
kubectl -n $ns get dbm,deploy
note "v1 serves: GET /admin/documents -> $(kubectl get --raw "/api/v1/namespaces/$ns/services/admin-dashboard:8080/proxy/admin/documents" | head -c 80)"

say "Release v2: its Deployment and its DatabaseMigration in ONE kubectl apply (the Deployment first)"
kubectl -n $ns apply -f examples/incident/manifests/release-v2.yaml
paused=$(kubectl -n $ns get deploy admin-dashboard -o jsonpath='{.spec.paused}')
held=$(kubectl -n $ns get deploy admin-dashboard -o jsonpath='{.metadata.annotations.schemagate\.dev/held-for}')
note "Deployment paused=$paused held-for=$held (set by the admission webhook before it was stored)"
note "ReplicaSets of v2 so far: $(kubectl -n $ns get rs -o jsonpath='{range .items[*]}{.metadata.annotations.deployment\.kubernetes\.io/revision}{" "}{.spec.template.metadata.annotations.schemagate\.dev/revision}{"\n"}{end}' | grep -c ' 0002$' || true)"
kubectl -n $ns get events --field-selector involvedObject.name=admin-dashboard,reason=RolloutHeld -o custom-columns=REASON:.reason,MESSAGE:.message --no-headers 2>/dev/null | tail -1 | sed 's/^/         /' || true
note "v1 keeps serving meanwhile: $(kubectl -n $ns get deploy admin-dashboard -o jsonpath='{.status.readyReplicas}') Ready pods"

say "The migration Job runs alembic upgrade head inside the cluster"
kubectl -n $ns wait --for=condition=Ready dbm/app-db --timeout=180s >/dev/null
kubectl -n $ns get jobs
note "alembic_version in the database: $(DATABASE_URL=$db_url "$bin/schemagate" probe --engine postgres --tool alembic)"

say "v2 released and rolled out"
kubectl -n $ns rollout status deploy/admin-dashboard --timeout=180s
kubectl -n $ns get dbm,deploy,rs
note "v2 serves: GET /admin/documents -> $(kubectl get --raw "/api/v1/namespaces/$ns/services/admin-dashboard:8080/proxy/admin/documents" | head -c 120)"
kubectl -n $ns get events --sort-by=.lastTimestamp -o custom-columns=OBJECT:.involvedObject.name,REASON:.reason,MESSAGE:.message --no-headers \
  | grep -E 'RolloutHeld|RolloutReleased|JobCreated|MigrationSucceeded|RevisionAdopted' | sed 's/^/         /'

say "Pre-deployment check for pipelines"
"$bin/schemagate" check -n $ns

say "Done. The cluster and the operator keep running."
note "export KUBECONFIG=$KUBECONFIG"
note "kubectl: $K8S_BIN kubectl -n $ns get dbm,deploy"
note "stop it: make demo-down"
if [ "${SCHEMAGATE_DEMO_EXIT:-0}" = 1 ]; then
  "$root/examples/incident/demo-down.sh"
fi
