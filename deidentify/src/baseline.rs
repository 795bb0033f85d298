//! The ingest benchmark's baseline: the same export read by the same readers and encoded as plain
//! Parquet, into a sink that keeps nothing, so `enclave bench ingest` can compare throughput without
//! storing an identifiable row. Only counts leave this module.

use std::collections::BTreeMap;
use std::path::Path;

use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use policies::{CsvMapping, Table};

use crate::read::{Item, Pass, discover, read_file};
use crate::transform::{TableOutput, plain_schema};
use crate::{Error, Result};

/// Rows read and encoded, in all and per table.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    /// Rows of every table.
    pub rows: u64,
    /// Rows per table.
    pub per_table: BTreeMap<&'static str, u64>,
}

/// Reads the export at `input` (CSV with `mappings`, or FHIR) and encodes every row as it was read into
/// Parquet (Snappy, row groups of at most `row_group_rows` rows or `row_group_bytes` bytes) written to
/// `std::io::sink()`.
pub fn encode_to_sink(
    input: &Path,
    mappings: &[CsvMapping],
    row_group_rows: usize,
    row_group_bytes: usize,
) -> Result<Encoded> {
    let sink_err = |e: parquet::errors::ParquetError| Error::Sink(e.to_string());
    let discovery = discover(input, mappings)?;
    let mut writers = BTreeMap::new();
    for t in Table::ALL {
        let schema = plain_schema(t);
        let props = WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_max_row_group_row_count(Some(row_group_rows))
            .set_max_row_group_bytes(Some(row_group_bytes))
            .build();
        let writer =
            ArrowWriter::try_new(std::io::sink(), schema.clone(), Some(props)).map_err(sink_err)?;
        writers.insert(t, (TableOutput::new(schema), writer));
    }
    let mut out = Encoded::default();
    for file in &discovery.files {
        read_file(file, Pass::All, &mut BTreeMap::new(), &mut |item| {
            if let Item::Record(rec) = item {
                out.rows += 1;
                *out.per_table.entry(rec.table.name()).or_default() += 1;
                if let Some((buf, w)) = writers.get_mut(&rec.table) {
                    buf.push_source(&rec);
                    if buf.len() >= 8192 {
                        let batch = buf.take_batch().map_err(|e| Error::Sink(e.to_string()))?;
                        w.write(&batch).map_err(sink_err)?;
                    }
                }
            }
            Ok(())
        })?;
    }
    for (_, (mut buf, mut w)) in writers {
        if !buf.is_empty() {
            let batch = buf.take_batch().map_err(|e| Error::Sink(e.to_string()))?;
            w.write(&batch).map_err(sink_err)?;
        }
        w.close().map_err(sink_err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of the Synthea sample is read and encoded, and only counts come back.
    #[test]
    fn the_baseline_encodes_every_row_of_the_sample_and_returns_counts() {
        let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/synthea-csv-27");
        let e = encode_to_sink(&input, &CsvMapping::synthea(), 65_536, 4 << 20).expect("encodes");
        let want = [
            ("patients", 27),
            ("encounters", 604),
            ("conditions", 438),
            ("observations", 990),
            ("medications", 663),
            ("procedures", 249),
        ];
        for (table, rows) in want {
            assert_eq!(e.per_table.get(table), Some(&rows), "{table}");
        }
        assert_eq!(e.rows, want.iter().map(|(_, n)| n).sum::<u64>());
    }
}
