//! meterflow's administration: creating the Kafka topics, applying the ClickHouse
//! migrations, and second chances for parked aggregates and dead-lettered events. Used by the `meterflow-admin` binary and by `meterflow-testkit`, which gives
//! every test its own topics and database.

pub mod audit;
pub mod checkpoints;
pub mod cli;
pub mod cluster;
pub mod keys;
pub mod migrations;
pub mod reconcile;
pub mod replay;
pub mod rollups;
pub mod sql;
pub mod topics;

pub use migrations::{migrate, migrate_to, migrate_with, Migration, MigrationSource};
pub use topics::{create_topics, list_topics, Partitions, TopicReport};
