//! The researchers' SQL gateway: one server (axum + tokio) speaking HTTP JSON, Arrow Flight SQL and the
//! Postgres wire protocol, plus the governance board's catalog UI. Every statement passes authentication,
//! Cedar authorisation, the DP engine, the budget ledger and the audit log before any answer leaves.
//!
//! Not built yet: this crate is the boundary the gateway issue fills in. It depends on nothing so far,
//! and nothing depends on it.
