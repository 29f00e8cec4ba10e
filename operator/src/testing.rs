//! Fixtures for unit tests.

use schemagate_crds::DatabaseMigration;

/// A DatabaseMigration from YAML, as a fixture.
pub fn migration_from_yaml(yaml: &str) -> DatabaseMigration {
    serde_yaml::from_str(yaml).expect("fixture is a DatabaseMigration")
}
