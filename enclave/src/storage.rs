//! Encrypted Parquet at rest, and reading it back through DataFusion.
//!
//! Every file of a dataset version is written with Parquet modular encryption (AES-GCM, encrypted footer,
//! so it ends in `PARE`) under that version's data key. The footer's key metadata holds only the key's ID;
//! readers resolve the ID through the [`Keystore`]. DataFusion reads the tables through an
//! [`EncryptionFactory`] registered on its runtime, so decrypted pages exist only in memory: every
//! session's disk manager is disabled (an operator short of memory fails rather than spill rows to a
//! temporary file), and `query_runtime` gives one query a memory pool of its own.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::common::config::{EncryptionFactoryOptions, TableParquetOptions};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::parquet_encryption::EncryptionFactory;
use datafusion::prelude::SessionContext;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::encryption::decrypt::{FileDecryptionProperties, KeyRetriever};
use parquet::encryption::encrypt::FileEncryptionProperties;
use parquet::file::properties::WriterProperties;

use crate::keys::{Keystore, Secret};
use crate::{Error, Result};

/// Row-group size: bounds the writer's memory whatever the table's size.
pub const ROW_GROUP_ROWS: usize = 64 * 1024;

/// Row-group size in (estimated encoded) bytes: wide tables (notes) flush long before 64k rows, so every
/// table's buffered row group stays small whatever the input.
pub const ROW_GROUP_BYTES: usize = 4 * 1024 * 1024;

/// Writer properties for one encrypted file.
fn writer_props(key_id: &str, key: &Secret) -> Result<WriterProperties> {
    let enc = FileEncryptionProperties::builder(key.to_vec())
        .with_footer_key_metadata(key_id.as_bytes().to_vec())
        .build()?;
    Ok(WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .with_file_encryption_properties(enc)
        .build())
}

/// Writes record batches to one encrypted Parquet file, then fsyncs it.
pub struct EncryptedWriter {
    writer: ArrowWriter<File>,
    rows: u64,
}

impl EncryptedWriter {
    /// Creates `path` (which must not exist) for `schema`.
    pub fn create(
        path: &Path,
        schema: SchemaRef,
        key_id: &str,
        key: &Secret,
    ) -> Result<EncryptedWriter> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let writer = ArrowWriter::try_new(file, schema, Some(writer_props(key_id, key)?))?;
        Ok(EncryptedWriter { writer, rows: 0 })
    }

    /// Appends a batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.rows += batch.num_rows() as u64;
        self.writer.write(batch)?;
        Ok(())
    }

    /// Bytes buffered in memory for the open row group.
    pub fn in_progress_bytes(&self) -> usize {
        self.writer.in_progress_size()
    }

    /// Writes the footer and fsyncs; returns the rows written.
    pub fn finish(self) -> Result<u64> {
        let file = self.writer.into_inner()?;
        file.sync_all().map_err(|e| Error::Io("sync".into(), e))?;
        Ok(self.rows)
    }
}

/// Reads back a file this process wrote under `key` (the ingest's staged tables, before they are
/// published), batch by batch: decrypted pages exist only in memory.
pub fn read_encrypted(
    path: &Path,
    key: &Secret,
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let decryption = FileDecryptionProperties::builder(key.to_vec()).build()?;
    let options = ArrowReaderOptions::new().with_file_decryption_properties(decryption);
    Ok(
        ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)?
            .with_batch_size(8192)
            .build()?,
    )
}

/// Resolves Parquet key metadata (a data-key ID) to the key, through the keystore.
struct KeystoreRetriever {
    keystore: Arc<Keystore>,
    cache: Mutex<HashMap<String, Secret>>,
}

impl KeyRetriever for KeystoreRetriever {
    fn retrieve_key(&self, key_metadata: &[u8]) -> parquet::errors::Result<Vec<u8>> {
        let id = std::str::from_utf8(key_metadata).map_err(|_| {
            parquet::errors::ParquetError::General("key metadata is not a key ID".into())
        })?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(id) {
            return Ok(k.to_vec());
        }
        let key = self.keystore.get(id).map_err(|e| {
            parquet::errors::ParquetError::General(format!("cannot open data key: {e}"))
        })?;
        let out = key.to_vec();
        cache.insert(id.to_owned(), key);
        Ok(out)
    }
}

/// DataFusion's hook into our keystore.
pub struct KeystoreEncryptionFactory {
    retriever: Arc<KeystoreRetriever>,
}

impl std::fmt::Debug for KeystoreEncryptionFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeystoreEncryptionFactory")
    }
}

/// The ID the factory is registered under.
pub const FACTORY_ID: &str = "enclave-keystore";

#[async_trait]
impl EncryptionFactory for KeystoreEncryptionFactory {
    async fn get_file_encryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        _schema: &SchemaRef,
        _file_path: &object_store::path::Path,
    ) -> datafusion::error::Result<Option<Arc<FileEncryptionProperties>>> {
        // The enclave writes through `EncryptedWriter`, never through DataFusion.
        Err(datafusion::error::DataFusionError::Plan(
            "writing tables through SQL is not allowed".into(),
        ))
    }

    async fn get_file_decryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        _file_path: &object_store::path::Path,
    ) -> datafusion::error::Result<Option<Arc<FileDecryptionProperties>>> {
        Ok(Some(
            FileDecryptionProperties::with_key_retriever(self.retriever.clone()).build()?,
        ))
    }
}

/// A DataFusion session that can read the enclave's encrypted tables. Its disk manager is disabled: an
/// operator that runs out of memory fails rather than spill decrypted rows to a temporary file.
pub(crate) fn session(keystore: Arc<Keystore>) -> Result<SessionContext> {
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_disk_manager_builder(no_spill())
        .build_arc()?;
    let ctx = SessionContext::new_with_config_rt(Default::default(), runtime);
    let factory = KeystoreEncryptionFactory {
        retriever: Arc::new(KeystoreRetriever {
            keystore,
            cache: Mutex::new(HashMap::new()),
        }),
    };
    ctx.runtime_env()
        .register_parquet_encryption_factory(FACTORY_ID, Arc::new(factory));
    Ok(ctx)
}

/// A disk manager that writes nothing: spilling would put decrypted rows at rest.
pub fn no_spill() -> datafusion::execution::disk_manager::DiskManagerBuilder {
    datafusion::execution::disk_manager::DiskManagerBuilder::default()
        .with_mode(datafusion::execution::disk_manager::DiskManagerMode::Disabled)
}

/// The runtime of one query on `ctx`: the session's (its encryption factory, caches and object
/// stores) with a memory pool of `memory` bytes of its own, so one query's need cannot fail another's.
pub(crate) fn query_runtime(
    ctx: &SessionContext,
    memory: Option<usize>,
) -> Arc<datafusion::execution::runtime_env::RuntimeEnv> {
    let base = ctx.runtime_env();
    match memory {
        Some(bytes) => {
            let mut runtime = (*base).clone();
            runtime.memory_pool = Arc::new(
                datafusion::execution::memory_pool::GreedyMemoryPool::new(bytes),
            );
            Arc::new(runtime)
        }
        None => base,
    }
}

/// Registers one encrypted Parquet file as table `name`.
pub(crate) async fn register_table(ctx: &SessionContext, name: &str, file: &Path) -> Result<()> {
    let mut options = TableParquetOptions::default();
    options.crypto.factory_id = Some(FACTORY_ID.to_owned());
    let format = ParquetFormat::default().with_options(options);
    let listing = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
    let url = ListingTableUrl::parse(file.to_string_lossy())?;
    let config = ListingTableConfig::new(url)
        .with_listing_options(listing)
        .infer_schema(&ctx.state())
        .await?;
    ctx.register_table(name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}

/// A decrypting session, for tests that inspect what ingest wrote. Never in a release build.
#[cfg(feature = "danger-test-hooks")]
pub fn danger_session(keystore: Arc<Keystore>) -> Result<SessionContext> {
    session(keystore)
}

/// Registers an encrypted Parquet file in a [`danger_session`]. Never in a release build.
#[cfg(feature = "danger-test-hooks")]
pub async fn danger_register_table(ctx: &SessionContext, name: &str, file: &Path) -> Result<()> {
    register_table(ctx, name, file).await
}
