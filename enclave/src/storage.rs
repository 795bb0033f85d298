//! Encrypted Parquet at rest, and reading it back through DataFusion.
//!
//! Every file of a dataset version is written with Parquet modular encryption (AES-GCM, encrypted footer,
//! so it ends in `PARE`) under that version's data key. [`EncryptedWriter`] encodes each batch's columns on
//! two threads and cuts row groups itself; [`Encoding`] says whether a file is published or a staged
//! scratch file read back once. The footer's key metadata holds only the key's ID;
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
use parquet::arrow::arrow_writer::{
    ArrowColumnWriter, ArrowLeafColumn, ArrowRowGroupWriterFactory, compute_leaves,
};
use parquet::basic::Compression;
use parquet::encryption::decrypt::{FileDecryptionProperties, KeyRetriever};
use parquet::encryption::encrypt::FileEncryptionProperties;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::ColumnPath;

use crate::keys::{Keystore, Secret};
use crate::{Error, Result};

/// Row-group size: bounds the writer's memory whatever the table's size.
pub const ROW_GROUP_ROWS: usize = 64 * 1024;

/// Row-group size in (estimated encoded) bytes: wide tables (notes) flush long before 64k rows, so every
/// table's buffered row group stays small whatever the input.
pub const ROW_GROUP_BYTES: usize = 4 * 1024 * 1024;

/// How a file's columns are encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// What is published and queried: dictionary encoding (but for the `plain` columns, whose values are
    /// mostly distinct), Snappy compression, statistics for pruning.
    Final {
        /// Columns written without a dictionary.
        plain: Vec<String>,
    },
    /// A staged file this process reads back once and rewrites: plain encoding, no compression and no
    /// statistics (the cheapest to write and to read back; encrypted all the same).
    Scratch,
}

/// Writer properties for one encrypted file.
fn writer_props(key_id: &str, key: &Secret, encoding: Encoding) -> Result<WriterProperties> {
    let enc = FileEncryptionProperties::builder(key.to_vec())
        .with_footer_key_metadata(key_id.as_bytes().to_vec())
        .build()?;
    // Row groups are cut by `EncryptedWriter::write` (at most ROW_GROUP_ROWS rows or ROW_GROUP_BYTES).
    let builder = WriterProperties::builder().with_file_encryption_properties(enc);
    Ok(match encoding {
        Encoding::Final { plain } => plain
            .into_iter()
            .fold(builder.set_compression(Compression::SNAPPY), |b, column| {
                b.set_column_dictionary_enabled(ColumnPath::from(column), false)
            }),
        Encoding::Scratch => builder
            .set_compression(Compression::UNCOMPRESSED)
            .set_dictionary_enabled(false)
            .set_statistics_enabled(parquet::file::properties::EnabledStatistics::None),
    }
    .build())
}

/// Writes record batches to one encrypted Parquet file, then fsyncs it. Each batch's columns are encoded
/// on two threads (split where half the batch's bytes lie): encoding is most of a write's work.
pub struct EncryptedWriter {
    file: SerializedFileWriter<File>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// The open row group's column writers, and its rows.
    open: Option<(Vec<ArrowColumnWriter>, usize)>,
    /// Estimated encoded bytes per row of the last closed row group (0 before the first).
    bytes_per_row: usize,
    row_groups: usize,
    rows: u64,
}

impl EncryptedWriter {
    /// Creates `path` (which must not exist) for `schema`, encoded for publishing.
    pub fn create(
        path: &Path,
        schema: SchemaRef,
        key_id: &str,
        key: &Secret,
    ) -> Result<EncryptedWriter> {
        let encoding = Encoding::Final { plain: Vec::new() };
        EncryptedWriter::create_as(path, schema, key_id, key, encoding)
    }

    /// Creates `path` (which must not exist) for `schema`, encoded as `encoding` says.
    pub fn create_as(
        path: &Path,
        schema: SchemaRef,
        key_id: &str,
        key: &Secret,
        encoding: Encoding,
    ) -> Result<EncryptedWriter> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // The high-level writer sets the file up (Arrow schema in the footer, encryptor); the columns are
        // then encoded through its lower-level parts.
        let props = writer_props(key_id, key, encoding)?;
        let (file, factory) =
            ArrowWriter::try_new(file, schema.clone(), Some(props))?.into_serialized_writer()?;
        Ok(EncryptedWriter {
            file,
            factory,
            schema,
            open: None,
            bytes_per_row: 0,
            row_groups: 0,
            rows: 0,
        })
    }

    /// Appends a batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut at = 0;
        while at < batch.num_rows() {
            let open_rows = self.open.as_ref().map_or(0, |(_, rows)| *rows);
            let mut take = (batch.num_rows() - at).min(ROW_GROUP_ROWS - open_rows);
            // Rows that fit the byte limit at the open group's average row size, or the last group's
            // when this one is empty (at least one row).
            let bytes = self.in_progress_bytes();
            let per_row = match open_rows {
                0 => self.bytes_per_row,
                n => bytes / n,
            };
            if let Some(room) = ROW_GROUP_BYTES.saturating_sub(bytes).checked_div(per_row) {
                take = take.min(room.max(1));
            }
            self.encode(&batch.slice(at, take))?;
            at += take;
            if self
                .open
                .as_ref()
                .is_some_and(|(_, rows)| *rows >= ROW_GROUP_ROWS)
                || self.in_progress_bytes() >= ROW_GROUP_BYTES
            {
                self.close_row_group()?;
            }
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Encodes `batch` into the open row group (opening one if none is).
    fn encode(&mut self, batch: &RecordBatch) -> Result<()> {
        let (writers, rows) = match &mut self.open {
            Some(open) => open,
            none => none.insert((self.factory.create_column_writers(self.row_groups)?, 0)),
        };
        let mut leaves = Vec::with_capacity(writers.len());
        let mut sizes = Vec::with_capacity(writers.len());
        for (field, column) in self.schema.fields().iter().zip(batch.columns()) {
            for leaf in compute_leaves(field, column)? {
                leaves.push(leaf);
                sizes.push(column.get_array_memory_size());
            }
        }
        if leaves.len() != writers.len() {
            return Err(Error::Internal(format!(
                "{} leaf columns for {} column writers",
                leaves.len(),
                writers.len()
            )));
        }
        // The first columns up to half the bytes on a second thread, the rest on this one.
        let half = sizes.iter().sum::<usize>() / 2;
        let mut sum = 0;
        let split = sizes
            .iter()
            .position(|s| {
                sum += s;
                sum >= half
            })
            .map_or(0, |i| i + 1)
            .min(writers.len().saturating_sub(1));
        let (first, rest) = writers.split_at_mut(split);
        let (first_leaves, rest_leaves) = leaves.split_at(split);
        let encode = |writers: &mut [ArrowColumnWriter], leaves: &[ArrowLeafColumn]| {
            writers
                .iter_mut()
                .zip(leaves)
                .try_for_each(|(w, leaf)| w.write(leaf))
        };
        if first.is_empty() {
            encode(rest, rest_leaves)?;
            *rows += batch.num_rows();
            return Ok(());
        }
        std::thread::scope(|scope| -> Result<()> {
            let other = scope.spawn(|| encode(first, first_leaves));
            let here = encode(rest, rest_leaves);
            other
                .join()
                .map_err(|_| Error::Internal("a column encoder panicked".into()))??;
            Ok(here?)
        })?;
        *rows += batch.num_rows();
        Ok(())
    }

    /// Closes the open row group (if any) into the file.
    fn close_row_group(&mut self) -> Result<()> {
        let bytes = self.in_progress_bytes();
        let Some((writers, rows)) = self.open.take() else {
            return Ok(());
        };
        self.bytes_per_row = bytes / rows.max(1);
        let mut group = self.file.next_row_group()?;
        for writer in writers {
            writer.close()?.append_to_row_group(&mut group)?;
        }
        group.close()?;
        self.row_groups += 1;
        Ok(())
    }

    /// Bytes buffered in memory for the open row group (their estimated encoded size).
    pub fn in_progress_bytes(&self) -> usize {
        self.open.as_ref().map_or(0, |(writers, _)| {
            writers.iter().map(|w| w.get_estimated_total_bytes()).sum()
        })
    }

    /// Writes the footer and fsyncs; returns the rows written.
    pub fn finish(mut self) -> Result<u64> {
        self.close_row_group()?;
        let file = self.file.into_inner()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("text", DataType::Utf8, true),
        ]))
    }

    fn batch(from: i64, rows: usize, width: usize) -> RecordBatch {
        let ids: Int64Array = (from..from + rows as i64).collect();
        let text: StringArray = (from..from + rows as i64)
            .map(|i| (i % 7 != 0).then(|| format!("{i:0width$}")))
            .collect();
        RecordBatch::try_new(schema(), vec![Arc::new(ids), Arc::new(text)]).expect("batch")
    }

    type Chunk = (Compression, bool, bool);
    type Rows = Vec<(i64, Option<String>)>;

    /// The row groups of a file, its rows read back in order, and per column of its first row group the
    /// compression, whether it has a dictionary, and whether it has statistics.
    fn read_back(path: &Path, key: &Secret) -> (Vec<usize>, Rows, Vec<Chunk>) {
        let decryption = FileDecryptionProperties::builder(key.to_vec())
            .build()
            .expect("decryption");
        let options = ArrowReaderOptions::new().with_file_decryption_properties(decryption);
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(
            File::open(path).expect("open"),
            options,
        )
        .expect("reader");
        let groups = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows() as usize)
            .collect();
        let chunks = builder
            .metadata()
            .row_groups()
            .first()
            .map(|g| {
                g.columns()
                    .iter()
                    .map(|c| {
                        let dictionary = c.dictionary_page_offset().is_some();
                        (c.compression(), dictionary, c.statistics().is_some())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut rows = Vec::new();
        for b in builder.build().expect("build") {
            let b = b.expect("batch");
            let ids = b.column(0).as_primitive::<Int64Type>();
            let text = b.column(1).as_string::<i32>();
            for r in 0..b.num_rows() {
                let t = (!text.is_null(r)).then(|| text.value(r).to_owned());
                rows.push((ids.value(r), t));
            }
        }
        (groups, rows, chunks)
    }

    #[test]
    fn rows_come_back_in_order_in_row_groups_bounded_by_rows_and_bytes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = crate::keys::random_secret().expect("key");
        for (encoding, width) in [
            (Encoding::Scratch, 4),
            (Encoding::Final { plain: vec![] }, 4),
            (
                Encoding::Final {
                    plain: vec!["text".into()],
                },
                4,
            ),
            (Encoding::Scratch, 300),
        ] {
            let path = tmp.path().join(format!("{width}-{encoding:?}.parquet"));
            let mut w =
                EncryptedWriter::create_as(&path, schema(), "dk-test", &key, encoding.clone())
                    .expect("create");
            // Odd batch sizes, one empty, one larger than a row group.
            let sizes = [1usize, 8191, 0, 70_000, 3, 40_000];
            let mut from = 0;
            for n in sizes {
                w.write(&batch(from, n, width)).expect("write");
                from += n as i64;
            }
            assert_eq!(w.finish().expect("finish"), from as u64);
            let (groups, rows, chunks) = read_back(&path, &key);
            assert_eq!(rows.len(), from as usize, "{encoding:?}");
            // (id, text): Scratch is plain and bare; Final is Snappy with statistics, a dictionary
            // unless the column is listed plain.
            let want = match &encoding {
                Encoding::Scratch => vec![(Compression::UNCOMPRESSED, false, false); 2],
                Encoding::Final { plain } => vec![
                    (Compression::SNAPPY, true, true),
                    (Compression::SNAPPY, plain.is_empty(), true),
                ],
            };
            assert_eq!(chunks, want, "{encoding:?}");
            for (i, (id, text)) in rows.iter().enumerate() {
                assert_eq!(*id, i as i64);
                assert_eq!(text.is_some(), i % 7 != 0);
            }
            assert!(groups.iter().all(|g| *g <= ROW_GROUP_ROWS), "{groups:?}");
            assert_eq!(groups.iter().sum::<usize>(), from as usize);
            if width > 100 {
                // Uncompressed, ~300 bytes a row: the byte limit cuts groups long before 65,536 rows,
                // the first rows of a fresh group included (sized by the group before).
                // (Parquet's estimate of a row is somewhat under its 300 bytes of text.)
                assert!(
                    groups.len() >= from as usize / (ROW_GROUP_BYTES / 300),
                    "{groups:?}"
                );
                assert!(
                    groups.iter().all(|g| *g <= ROW_GROUP_BYTES / 200),
                    "{groups:?}"
                );
                let full = &groups[..groups.len() - 1];
                let (lo, hi) = (full.iter().min(), full.iter().max());
                assert!(
                    lo.zip(hi).is_some_and(|(l, h)| h - l < h / 20),
                    "{groups:?}"
                );
            }
            let bytes = std::fs::read(&path).expect("file");
            assert!(bytes.ends_with(b"PARE"), "encrypted footer");
            let value = format!("{:0width$}", 100_003);
            let needle = &value.as_bytes()[value.len().saturating_sub(12)..];
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "no value in clear"
            );
        }
    }

    #[test]
    fn an_empty_file_is_a_valid_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = crate::keys::random_secret().expect("key");
        let path = tmp.path().join("empty.parquet");
        let w = EncryptedWriter::create(&path, schema(), "dk-test", &key).expect("create");
        assert_eq!(w.finish().expect("finish"), 0);
        let (groups, rows, _) = read_back(&path, &key);
        assert!(groups.is_empty() && rows.is_empty());
    }
}
