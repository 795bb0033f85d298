//! The researchers' gateway. Every request passes authentication (two factors), authorization, the DP
//! engine, the budget ledger and the audit log before any answer leaves.
//!
//! - `auth`: the accounts (API token + TOTP), sessions, replay protection, rate limiting and the audit
//!   records of each.
//! - `authz`: Cedar policies (schema and defaults in `policies/cedar/`) that decide every request and
//!   name the deciding policies.
//! - `service`: what every protocol does (sign in, datasets, budgets, queries under Cedar and the
//!   limits), protocol-independent.
//! - `http`: the HTTP JSON listener. (Arrow Flight SQL and Postgres wire come next.)
//!
//! `enclave-cli` links this crate for `enclave serve`, `enclave users`, `enclave login` and
//! `enclave policies check`.

pub mod auth;
pub mod authz;
pub mod http;
pub mod service;
