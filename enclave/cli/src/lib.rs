//! Beside the `enclave` command's own file: `access`, the `enclave access` commands (requests and grants
//! from the host); the demo generator (synthetic provider exports) and the benchmarks
//! (`enclave bench …`, which print figures; `bench_gateway` loads the gateway's Flight SQL listener,
//! `bench_ui` times the web UI's pages). The
//! demo and the benchmarks are not part of the core library: the demo writes only synthetic data, and the
//! benchmarks read rows only of datasets they made (`enclave::baseline`).

pub mod access;
pub mod bench;
pub mod bench_gateway;
pub mod bench_ui;
pub mod demo;
