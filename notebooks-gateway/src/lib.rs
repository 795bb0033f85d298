//! The researchers' gateway. Every request passes authentication (two factors), authorization, the DP
//! engine, the budget ledger and the audit log before any answer leaves.
//!
//! - `auth`: the accounts (API token + TOTP, or a passkey), sessions, replay protection, rate limiting
//!   and the audit records of each (a refused sign-in carries its record's receipt).
//! - `authz`: Cedar policies (schema and defaults in `policies/cedar/`) that decide every request and
//!   name the deciding policies; an earlier version's policy directory is brought up to date.
//! - `access`: access requests and grants as the gateway serves them (Cedar decides each step).
//! - `service`: what every protocol does (sign in, datasets, budgets, queries under Cedar and the
//!   limits), protocol-independent.
//! - `tls`: the listeners' TLS (rustls): certificate and key from PEM files, a self-signed local pair.
//! - `conn`: accepted connections with a cap, a first-bytes deadline and an idle limit.
//! - `http`: the HTTP JSON listener.
//! - `web`: the web UI on the HTTP listener (server-rendered pages: datasets, requests, grants, audit).
//! - `flight`: the Arrow Flight SQL listener (opaque single-use tickets, prepared statements, catalog).
//! - `pg`: the Postgres wire listener (simple and extended protocols; its `catalog` answers psql's,
//!   psycopg's and DBeaver's catalog queries from metadata; its `frames` cut oversized and stalled
//!   messages).
//!
//! `enclave-cli` links this crate for `enclave serve`, `enclave users`, `enclave login` and
//! `enclave policies check`.

pub mod access;
pub mod auth;
pub mod authz;
pub mod conn;
pub mod flight;
pub mod http;
pub mod pg;
pub mod service;
pub mod tls;
pub mod web;
