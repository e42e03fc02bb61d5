//! ClickHouse client with the settings every meterflow writer needs.

use crate::args::ClickHouseArgs;

/// A client bound to the configured database. Validation is off because the local server is
/// ClickHouse 18.16, which predates the column metadata the crate validates against.
pub fn client(args: &ClickHouseArgs) -> ::clickhouse::Client {
    ::clickhouse::Client::default()
        .with_url(&args.url)
        .with_user(&args.user)
        .with_password(&args.password)
        .with_database(&args.database)
        .with_validation(false)
}

/// A client on the server's `default` database, for creating databases.
pub fn admin_client(args: &ClickHouseArgs) -> ::clickhouse::Client {
    ::clickhouse::Client::default()
        .with_url(&args.url)
        .with_user(&args.user)
        .with_password(&args.password)
        .with_validation(false)
}
