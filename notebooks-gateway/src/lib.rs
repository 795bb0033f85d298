//! The researchers' gateway. Every request passes authentication (two factors), authorization, the DP
//! engine, the budget ledger and the audit log before any answer leaves.
//!
//! Built so far: `auth`, the accounts (API token + TOTP), sessions, replay protection, rate limiting and
//! the audit records of each. The protocol listeners (HTTP JSON, Arrow Flight SQL, Postgres wire) and
//! Cedar authorization come next; `enclave-cli` links this crate for `enclave users` and `enclave login`.

pub mod auth;
