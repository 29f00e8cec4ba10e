//! Fixtures for unit tests.

use schemagate_crds::DatabaseMigration;

/// A DatabaseMigration from YAML, as a fixture.
pub fn migration_from_yaml(yaml: &str) -> DatabaseMigration {
    serde_yaml::from_str(yaml).expect("fixture is a DatabaseMigration")
}

/// A DatabaseMigration of the incident: Alembic on PostgreSQL, revision 0002. Its migrator
/// env tries to set DATABASE_URL literally, which the Job must ignore.
pub const MIGRATION: &str = r#"
apiVersion: schemagate.dev/v1alpha1
kind: DatabaseMigration
metadata: { name: app-db, namespace: prod, uid: 1b4e28ba-2fa1-11d2-883f-0016d3cca427, generation: 3 }
spec:
  database:
    engine: postgres
    urlSecretRef: { name: app-db-url, key: url }
    tracking: { tool: alembic }
  migrator:
    image: registry.example/app:4515ca8
    command: [alembic, upgrade, head]
    env: [{ name: DATABASE_URL, value: "postgres://nobody:leak@example/x" }, { name: LOG, value: debug }]
  revision: "0002"
"#;
