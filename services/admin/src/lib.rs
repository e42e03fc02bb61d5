//! meterflow's administration: creating the Kafka topics and applying the ClickHouse
//! migrations. Used by the `meterflow-admin` binary and by `meterflow-testkit`, which gives
//! every test its own topics and database.

pub mod keys;
pub mod migrations;
pub mod sql;
pub mod topics;

pub use migrations::{migrate, migrate_with, Migration, MigrationSource};
pub use topics::{create_topics, list_topics, Partitions, TopicReport};
