//! The researchers' gateway. Every request passes authentication (two factors), authorization, the DP
//! engine, the budget ledger and the audit log before any answer leaves.
//!
//! Built so far: `auth`, the accounts (API token + TOTP), sessions, replay protection, rate limiting and
//! the audit records of each; `authz`, Cedar policies (schema and defaults in `policies/cedar/`) that
//! decide every request and name the deciding policies. The protocol listeners (HTTP JSON, Arrow Flight
//! SQL, Postgres wire) come next; `enclave-cli` links this crate for `enclave users`, `enclave login` and
//! `enclave policies check`.

pub mod auth;
pub mod authz;
