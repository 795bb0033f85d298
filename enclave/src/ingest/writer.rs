//! The writer thread: encodes, compresses and encrypts the tables' batches on a core of its own while the
//! reading thread de-identifies the next rows.
//!
//! Batches travel over a bounded channel (a few batches at most in flight, so memory stays flat); the
//! thread owns one [`EncryptedWriter`] per table and widens each table's coverage span as batches pass.
//! The first error stops the thread; the reading thread sees it at its next send or at [`finish`].
//!
//! [`finish`]: TableWriters::finish

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use arrow::array::{Array, Int64Array};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use policies::Table;

use crate::storage::EncryptedWriter;
use crate::{Error, Result};

/// The earliest and latest event of a table, as text.
pub(super) type Span = (Option<String>, Option<String>);

/// Batches waiting for the writer thread at most: bounds the memory the pipeline holds.
const IN_FLIGHT: usize = 4;

type Written = BTreeMap<Table, Span>;

/// One table's writer per table, on a thread of their own.
pub(super) struct TableWriters {
    to_thread: Option<SyncSender<(Table, RecordBatch)>>,
    thread: Option<JoinHandle<Result<Written>>>,
}

impl TableWriters {
    /// Starts the thread with these writers.
    pub(super) fn start(writers: BTreeMap<Table, EncryptedWriter>) -> Result<TableWriters> {
        let (to_thread, batches) = sync_channel::<(Table, RecordBatch)>(IN_FLIGHT);
        let thread = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || {
                let mut writers = writers;
                let mut spans: Written = writers.keys().map(|t| (*t, (None, None))).collect();
                for (table, batch) in batches {
                    let writer = writers
                        .get_mut(&table)
                        .ok_or_else(|| Error::Internal(format!("no writer for {table}")))?;
                    widen_span(spans.entry(table).or_default(), &batch)?;
                    writer.write(&batch)?;
                }
                for (_, w) in writers {
                    w.finish()?;
                }
                Ok(spans)
            })
            .map_err(|e| Error::Io("writer thread".into(), e))?;
        Ok(TableWriters {
            to_thread: Some(to_thread),
            thread: Some(thread),
        })
    }

    /// Hands a batch to the thread (waits while it is busy with earlier ones).
    pub(super) fn write(&mut self, table: Table, batch: RecordBatch) -> Result<()> {
        let sent = self
            .to_thread
            .as_ref()
            .is_some_and(|s| s.send((table, batch)).is_ok());
        if sent {
            Ok(())
        } else {
            // The thread stopped on an error: that error is the answer.
            Err(self
                .join()
                .err()
                .unwrap_or_else(|| Error::Internal("the writer thread stopped early".into())))
        }
    }

    /// Writes every footer, fsyncs every file, and returns each table's coverage span.
    pub(super) fn finish(mut self) -> Result<Written> {
        self.join()
    }

    fn join(&mut self) -> Result<Written> {
        self.to_thread = None;
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| Error::Internal("the writer thread panicked".into()))?,
            None => Err(Error::Internal("the writer thread already stopped".into())),
        }
    }
}

impl Drop for TableWriters {
    fn drop(&mut self) {
        // An abandoned run still waits for the thread, so its files are closed before staging goes.
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

/// Coverage: the earliest and latest event of the batch's first temporal (or year) column, compared as
/// numbers and only the two extremes formatted.
fn widen_span(span: &mut Span, batch: &RecordBatch) -> Result<()> {
    let schema = batch.schema();
    let Some((i, field)) = schema.fields().iter().enumerate().find(|(_, f)| {
        matches!(f.data_type(), DataType::Timestamp(..) | DataType::Date32)
            || (f.data_type() == &DataType::Int32 && f.name() != "birth_year")
    }) else {
        return Ok(());
    };
    let data_type = field.data_type().clone();
    let numbers = arrow::compute::cast(batch.column(i), &DataType::Int64)?;
    let Some(numbers) = numbers.as_any().downcast_ref::<Int64Array>() else {
        return Ok(());
    };
    let (Some(lo), Some(hi)) = (arrow::compute::min(numbers), arrow::compute::max(numbers)) else {
        return Ok(());
    };
    let extremes: Arc<dyn Array> = Arc::new(Int64Array::from(vec![lo, hi]));
    // Dates and years are 32-bit underneath: through that width to their own type.
    let physical = match data_type {
        DataType::Date32 | DataType::Int32 => DataType::Int32,
        _ => DataType::Int64,
    };
    let typed = arrow::compute::cast(&arrow::compute::cast(&extremes, &physical)?, &data_type)?;
    let text = arrow::compute::cast(&typed, &DataType::Utf8)?;
    let Some(text) = text.as_any().downcast_ref::<arrow::array::StringArray>() else {
        return Ok(());
    };
    for v in text.iter().flatten() {
        if span.0.as_deref().is_none_or(|m| v < m) {
            span.0 = Some(v.to_owned());
        }
        if span.1.as_deref().is_none_or(|m| v > m) {
            span.1 = Some(v.to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Date32Array, Int32Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema, TimeUnit};

    fn one(data_type: DataType, name: &str, column: Arc<dyn Array>) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new(name, data_type, true)])),
            vec![column],
        )
        .expect("batch")
    }

    #[test]
    fn spans_compare_times_as_times_and_skip_nulls() {
        let mut span = (None, None);
        let ts = TimestampMicrosecondArray::from(vec![
            Some(1_600_000_000_000_000),
            None,
            Some(-86_400_000_000),
            Some(1_700_000_000_000_000),
        ]);
        widen_span(
            &mut span,
            &one(
                DataType::Timestamp(TimeUnit::Microsecond, None),
                "start",
                Arc::new(ts),
            ),
        )
        .expect("span");
        assert_eq!(span.0.as_deref(), Some("1969-12-31T00:00:00"));
        assert_eq!(span.1.as_deref(), Some("2023-11-14T22:13:20"));
        let dates = Date32Array::from(vec![Some(-3650), Some(20_000)]);
        widen_span(&mut span, &one(DataType::Date32, "date", Arc::new(dates))).expect("span");
        assert_eq!(span.0.as_deref(), Some("1960-01-04"));
        assert_eq!(span.1.as_deref(), Some("2024-10-04"));
    }

    #[test]
    fn all_null_or_yearless_batches_leave_the_span() {
        let mut span = (None, None);
        let nulls = Int32Array::from(vec![None, None]);
        widen_span(&mut span, &one(DataType::Int32, "year", Arc::new(nulls))).expect("span");
        let births = Int32Array::from(vec![Some(1900)]);
        widen_span(
            &mut span,
            &one(DataType::Int32, "birth_year", Arc::new(births)),
        )
        .expect("span");
        assert_eq!(span, (None, None));
        let years = Int32Array::from(vec![Some(2001), Some(1999)]);
        widen_span(&mut span, &one(DataType::Int32, "year", Arc::new(years))).expect("span");
        assert_eq!(span, (Some("1999".into()), Some("2001".into())));
    }
}
