//! Exact figures for the benchmarks: a DataFusion session over the decrypted tables of a dataset that a
//! benchmark generated and ingested itself (provider `bench`, consent scope `benchmark`), so that `enclave
//! bench` can time plain DataFusion on the same rows and compare DP answers with the true values. Any
//! other dataset is refused: outside the tests, this and `DpEngine::answer` are the only ways to rows,
//! and this one never reaches a provider's data.

use std::sync::Arc;

use catalog::CatalogStore;
use datafusion::prelude::SessionContext;

use crate::{DataDir, Error, Result};

/// The provider ID a benchmark ingests under.
pub const BENCH_PROVIDER: &str = "bench";
/// The consent scope a benchmark ingests under.
pub const BENCH_SCOPE: &str = "benchmark";

/// The latest version of a benchmark's own dataset, its tables registered under their names.
pub struct Baseline {
    ctx: SessionContext,
}

impl Baseline {
    /// Opens `dataset` in `dir`, refused unless a benchmark made it.
    pub async fn open(dir: &DataDir, dataset: &str) -> Result<Baseline> {
        let version = dir.catalog()?.version(dataset, None)?;
        let p = &version.version.provenance;
        if p.provider != BENCH_PROVIDER || p.consent_scope != BENCH_SCOPE {
            return Err(Error::Config(format!(
                "dataset '{dataset}' was not made by a benchmark: only DP answers read it"
            )));
        }
        let ctx = crate::storage::session(Arc::new(dir.keystore()?))?;
        let vdir = dir.root().join(&version.version.storage_path);
        for t in &version.version.tables {
            crate::storage::register_table(&ctx, &t.name, &vdir.join(&t.file)).await?;
        }
        Ok(Baseline { ctx })
    }

    /// The session: plain DataFusion over the dataset's tables.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }
}
