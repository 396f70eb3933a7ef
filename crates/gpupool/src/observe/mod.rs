//! Observation: what reads the pool's snapshots and shows them to people and machines: the
//! dashboard, summary and report (`dashboard`), and the Prometheus exposition (`telemetry`,
//! with the `prometheus` feature). Nothing here changes the pool.

pub mod dashboard;
#[cfg(feature = "prometheus")]
pub mod telemetry;
