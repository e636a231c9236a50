//! Helpers shared by the registry's integration test files (each file includes this module).

/// The catalog a test uses: with the `postgres` feature and `VMI_TEST_POSTGRES_URL`
/// (`postgres://user@host:port`, see tests/postgres.sh) a fresh PostgreSQL database made for the
/// test; otherwise `None`, i.e. SQLite in the test's data directory.
pub async fn test_database() -> Option<String> {
    #[cfg(feature = "postgres")]
    if let Ok(base) = std::env::var("VMI_TEST_POSTGRES_URL") {
        let name = format!("vmi_t_{}", uuid::Uuid::new_v4().simple());
        let (client, conn) =
            tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to the test PostgreSQL server");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        return Some(format!("{base}/{name}"));
    }
    None
}
