//! The writer thread: encodes and encrypts the tables' batches (through [`EncryptedWriter`], which encodes
//! a batch's columns on two threads) while the reading thread de-identifies the next rows.
//!
//! Batches travel over a bounded channel (a few batches at most in flight, so memory stays flat); the
//! thread owns one [`EncryptedWriter`] per table and keeps each table's earliest and latest event as
//! batches pass (as numbers, formatted once at the end, to the month for dates and times).
//! The first error stops the thread; the reading thread sees it at its next send or at [`finish`].
//!
//! [`finish`]: TableWriters::finish

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Set when the run is dropped without [`TableWriters::finish`].
    abandoned: Arc<AtomicBool>,
}

impl TableWriters {
    /// Starts the thread with these writers.
    pub(super) fn start(writers: BTreeMap<Table, EncryptedWriter>) -> Result<TableWriters> {
        let (to_thread, batches) = sync_channel::<(Table, RecordBatch)>(IN_FLIGHT);
        let abandoned = Arc::new(AtomicBool::new(false));
        let stop = abandoned.clone();
        let thread = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || {
                let mut writers = writers;
                let mut extremes: BTreeMap<Table, Extremes> =
                    writers.keys().map(|t| (*t, Extremes::default())).collect();
                for (table, batch) in batches {
                    let writer = writers
                        .get_mut(&table)
                        .ok_or_else(|| Error::Internal(format!("no writer for {table}")))?;
                    extremes.entry(table).or_default().widen(&batch)?;
                    writer.write(&batch)?;
                }
                if stop.load(Ordering::Relaxed) {
                    // The run is abandoned: its files go with the staging directory, unfinished.
                    return Err(Error::Internal("the ingest stopped".into()));
                }
                for (_, w) in writers {
                    w.finish()?;
                }
                extremes
                    .into_iter()
                    .map(|(t, e)| Ok((t, e.span()?)))
                    .collect()
            })
            .map_err(|e| Error::Io("writer thread".into(), e))?;
        Ok(TableWriters {
            to_thread: Some(to_thread),
            thread: Some(thread),
            abandoned,
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
        // An abandoned run still waits for the thread, so its files are closed before staging goes,
        // but does not write their footers or sync them.
        if self.thread.is_some() {
            self.abandoned.store(true, Ordering::Relaxed);
            let _ = self.join();
        }
    }
}

/// The earliest and latest event seen so far, as numbers in the column's own unit, and its type.
#[derive(Default)]
struct Extremes(Option<(i64, i64, DataType)>);

impl Extremes {
    /// Widens by the batch's first temporal (or year) column, compared as numbers.
    fn widen(&mut self, batch: &RecordBatch) -> Result<()> {
        let schema = batch.schema();
        let Some((i, field)) = schema.fields().iter().enumerate().find(|(_, f)| {
            matches!(f.data_type(), DataType::Timestamp(..) | DataType::Date32)
                || (f.data_type() == &DataType::Int32 && f.name() != "birth_year")
        }) else {
            return Ok(());
        };
        let numbers = arrow::compute::cast(batch.column(i), &DataType::Int64)?;
        let Some(numbers) = numbers.as_any().downcast_ref::<Int64Array>() else {
            return Ok(());
        };
        let (Some(lo), Some(hi)) = (arrow::compute::min(numbers), arrow::compute::max(numbers))
        else {
            return Ok(());
        };
        self.0 = Some(match self.0.take() {
            Some((l, h, t)) => (l.min(lo), h.max(hi), t),
            None => (lo, hi, field.data_type().clone()),
        });
        Ok(())
    }

    /// The two extremes as the column's values in text.
    fn span(&self) -> Result<Span> {
        let Some((lo, hi, data_type)) = &self.0 else {
            return Ok((None, None));
        };
        let extremes: Arc<dyn Array> = Arc::new(Int64Array::from(vec![*lo, *hi]));
        // Dates and years are 32-bit underneath: through that width to their own type.
        let physical = match data_type {
            DataType::Date32 | DataType::Int32 => DataType::Int32,
            _ => DataType::Int64,
        };
        let typed = arrow::compute::cast(&arrow::compute::cast(&extremes, &physical)?, data_type)?;
        let text = arrow::compute::cast(&typed, &DataType::Utf8)?;
        let Some(text) = text.as_any().downcast_ref::<arrow::array::StringArray>() else {
            return Ok((None, None));
        };
        // The catalog shows coverage to the month: the exact first and last event are one person's.
        let at = |i: usize| {
            (!text.is_null(i)).then(|| {
                let v = text.value(i);
                match v.get(..7) {
                    Some(month) if v.as_bytes().get(4) == Some(&b'-') => month.to_owned(),
                    _ => v.to_owned(),
                }
            })
        };
        Ok((at(0), at(1)))
    }
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

    fn span_of(batches: &[RecordBatch]) -> Span {
        let mut e = Extremes::default();
        for b in batches {
            e.widen(b).expect("widen");
        }
        e.span().expect("span")
    }

    #[test]
    fn spans_compare_times_as_times_and_skip_nulls() {
        let ts = TimestampMicrosecondArray::from(vec![
            Some(1_600_000_000_000_000),
            None,
            Some(-86_400_000_000),
            Some(1_700_000_000_000_000),
        ]);
        let ts_type = DataType::Timestamp(TimeUnit::Microsecond, None);
        assert_eq!(
            span_of(&[one(ts_type, "start", Arc::new(ts))]),
            (Some("1969-12".into()), Some("2023-11".into()))
        );
        let dates = Date32Array::from(vec![Some(-3650), None, Some(20_000)]);
        assert_eq!(
            span_of(&[one(DataType::Date32, "date", Arc::new(dates))]),
            (Some("1960-01".into()), Some("2024-10".into()))
        );
    }

    #[test]
    fn spans_over_batches_compare_numbers_not_text() {
        // As text "1999" < "900" and "2023" < "900": the span must still be 900 to 2023.
        let years = |v: Vec<i32>| one(DataType::Int32, "year", Arc::new(Int32Array::from(v)));
        assert_eq!(
            span_of(&[years(vec![900, 2023]), years(vec![1999])]),
            (Some("900".into()), Some("2023".into()))
        );
    }

    #[test]
    fn all_null_or_yearless_batches_leave_the_span() {
        let nulls = Int32Array::from(vec![None, None]);
        let births = Int32Array::from(vec![Some(1900)]);
        assert_eq!(
            span_of(&[
                one(DataType::Int32, "year", Arc::new(nulls)),
                one(DataType::Int32, "birth_year", Arc::new(births)),
            ]),
            (None, None)
        );
    }
}
