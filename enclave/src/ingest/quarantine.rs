//! The quarantine: rows that cannot be released (unparseable, out of domain, over a person's row bound),
//! with their reason, written encrypted beside the version so the provider can fix the export.

use std::sync::Arc;

use arrow::array::{Array, StringArray};
use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;
use policies::Table;

use crate::Result;
use crate::storage::EncryptedWriter;

/// The open quarantine file and the rows waiting to be written to it.
pub(super) struct Quarantine {
    pub(super) writer: EncryptedWriter,
    pub(super) rows: Vec<[String; 4]>,
    pub(super) schema: Arc<Schema>,
}

impl Quarantine {
    pub(super) fn push(
        &mut self,
        table: Option<Table>,
        origin: String,
        reason: String,
        raw: String,
    ) -> Result<()> {
        self.rows.push([
            table.map_or("unknown", Table::name).to_owned(),
            origin,
            reason,
            raw,
        ]);
        if self.rows.len() >= 1024 {
            self.flush()
        } else {
            Ok(())
        }
    }

    pub(super) fn flush(&mut self) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let cols: Vec<Arc<dyn Array>> = (0..4)
            .map(|i| {
                Arc::new(
                    self.rows
                        .iter()
                        .map(|r| Some(r[i].as_str()))
                        .collect::<StringArray>(),
                ) as Arc<dyn Array>
            })
            .collect();
        self.rows.clear();
        self.writer
            .write(&RecordBatch::try_new(self.schema.clone(), cols)?)
    }
}
