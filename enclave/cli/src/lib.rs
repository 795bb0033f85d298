//! Beside the `enclave` command: the demo generator (synthetic provider exports) and the benchmarks
//! (`enclave bench …`, which print figures; `bench_gateway` loads the gateway's Flight SQL listener). Neither is part of the core library: the demo writes only
//! synthetic data, and the benchmarks read rows only of datasets they made (`enclave::baseline`).

pub mod bench;
pub mod bench_gateway;
pub mod demo;
