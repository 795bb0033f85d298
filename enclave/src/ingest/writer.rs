//! The writer thread: encodes and encrypts the tables' batches (through [`EncryptedWriter`], which encodes
//! a batch's columns on two threads) while the reading thread de-identifies the next rows.
//!
//! Batches travel over a bounded channel (a few batches at most in flight); the
//! thread owns one [`Sink`] per table and keeps each table's earliest and latest event as batches pass
//! (as numbers, formatted once at the end, to the month for dates and times). A sink is an encrypted file,
//! or batches held in memory while the run's staging budget lasts: past it, the table holding most goes to
//! its (encrypted, scratch) file, so memory stays bounded whatever the export's size. A run dropped
//! unfinished stops at the next batch, spilling nothing more.
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

/// Where a table's batches go.
pub(super) enum Sink {
    /// Into an encrypted file.
    File(Box<EncryptedWriter>),
    /// Held in memory while the staging budget lasts; past it, into the file `spill` creates.
    Held {
        /// Creates the table's file.
        spill: Box<dyn FnOnce() -> Result<EncryptedWriter> + Send>,
    },
}

/// What became of a table's batches.
#[derive(Default)]
pub(super) enum Staged {
    /// Written to its file, which is finished.
    File,
    /// Held in memory, in the order written.
    Memory(Vec<RecordBatch>),
    /// Nothing was written.
    #[default]
    Empty,
}

/// A sink on the thread.
enum Open {
    File(Box<EncryptedWriter>),
    Held {
        batches: Vec<RecordBatch>,
        bytes: usize,
        spill: Box<dyn FnOnce() -> Result<EncryptedWriter> + Send>,
    },
}

impl Open {
    /// Writes the held batches to the table's file; the file is the sink from now on.
    fn spill(self) -> Result<Open> {
        match self {
            Open::Held { batches, spill, .. } => {
                let mut w = spill()?;
                for b in &batches {
                    w.write(b)?;
                }
                Ok(Open::File(Box::new(w)))
            }
            file => Ok(file),
        }
    }
}

type Written = BTreeMap<Table, (Span, Staged)>;

/// One table's sink per table, on a thread of their own.
pub(super) struct TableWriters {
    to_thread: Option<SyncSender<(Table, RecordBatch)>>,
    thread: Option<JoinHandle<Result<Written>>>,
    /// Set when the run is dropped without [`TableWriters::finish`].
    abandoned: Arc<AtomicBool>,
}

impl TableWriters {
    /// Starts the thread with these sinks; the held ones together keep at most `budget` bytes of
    /// batches in memory.
    pub(super) fn start(sinks: BTreeMap<Table, Sink>, budget: usize) -> Result<TableWriters> {
        let (to_thread, batches) = sync_channel::<(Table, RecordBatch)>(IN_FLIGHT);
        let abandoned = Arc::new(AtomicBool::new(false));
        let stop = abandoned.clone();
        let thread = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || {
                let mut sinks: BTreeMap<Table, Open> = sinks
                    .into_iter()
                    .map(|(t, s)| {
                        let open = match s {
                            Sink::File(w) => Open::File(w),
                            Sink::Held { spill } => Open::Held {
                                batches: Vec::new(),
                                bytes: 0,
                                spill,
                            },
                        };
                        (t, open)
                    })
                    .collect();
                let mut extremes: BTreeMap<Table, Extremes> =
                    sinks.keys().map(|t| (*t, Extremes::default())).collect();
                let mut held = 0usize;
                for (table, batch) in batches {
                    if stop.load(Ordering::Relaxed) {
                        return Err(Error::Internal("the ingest stopped".into()));
                    }
                    let sink = sinks
                        .get_mut(&table)
                        .ok_or_else(|| Error::Internal(format!("no writer for {table}")))?;
                    extremes.entry(table).or_default().widen(&batch)?;
                    match sink {
                        Open::File(w) => w.write(&batch)?,
                        Open::Held { batches, bytes, .. } => {
                            let n = batch.get_array_memory_size();
                            *bytes += n;
                            held += n;
                            batches.push(batch);
                        }
                    }
                    // Over budget: the table holding most goes to its file, until under it again.
                    while held > budget {
                        let Some((largest, bytes)) = sinks
                            .iter()
                            .filter_map(|(t, s)| match s {
                                Open::Held { bytes, .. } if *bytes > 0 => Some((*t, *bytes)),
                                _ => None,
                            })
                            .max_by_key(|(_, bytes)| *bytes)
                        else {
                            break;
                        };
                        let open = sinks
                            .remove(&largest)
                            .ok_or_else(|| Error::Internal(format!("no writer for {largest}")))?;
                        sinks.insert(largest, open.spill()?);
                        held -= bytes;
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    // The run is abandoned: its files go with the staging directory, unfinished.
                    return Err(Error::Internal("the ingest stopped".into()));
                }
                let mut written = BTreeMap::new();
                for (table, open) in sinks {
                    let staged = match open {
                        Open::File(w) => {
                            w.finish()?;
                            Staged::File
                        }
                        Open::Held { batches, .. } => Staged::Memory(batches),
                    };
                    let span = extremes.remove(&table).unwrap_or_default().span()?;
                    written.insert(table, (span, staged));
                }
                Ok(written)
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

    /// Writes every footer, fsyncs every file, and returns each table's coverage span and what became
    /// of its batches.
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

    /// The rows of batches as (id, text).
    fn rows_of<'a>(batches: impl IntoIterator<Item = &'a RecordBatch>) -> Vec<(i32, String)> {
        use arrow::array::AsArray;
        batches
            .into_iter()
            .flat_map(|b| {
                let ids = b.column(0).as_primitive::<arrow::datatypes::Int32Type>();
                let text = b.column(1).as_string::<i32>();
                (0..b.num_rows())
                    .map(|r| (ids.value(r), text.value(r).to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn held_tables_stay_in_memory_until_the_budget_and_then_the_largest_goes_to_its_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = crate::keys::random_secret().expect("key");
        let schema = Arc::new(Schema::new(vec![
            Field::new("year", DataType::Int32, false),
            Field::new("text", DataType::Utf8, false),
        ]));
        let batch = |from: i32, rows: i32, width: usize| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int32Array::from_iter_values(from..from + rows)),
                    Arc::new(arrow::array::StringArray::from_iter_values(
                        (from..from + rows).map(|i| format!("{i:0width$}")),
                    )),
                ],
            )
            .expect("batch")
        };
        let held = |table: Table| {
            let (path, schema, key) = (
                tmp.path().join(format!("{table}.parquet")),
                schema.clone(),
                key.clone(),
            );
            let spill = move || {
                EncryptedWriter::create_as(
                    &path,
                    schema,
                    "dk-test",
                    &key,
                    crate::storage::Encoding::Scratch,
                )
            };
            Sink::Held {
                spill: Box::new(spill),
            }
        };
        // Wide rows for observations, narrow ones for notes: each table's three batches fit the budget
        // alone, but the last notes batch takes the two over it, and observations (holding most) goes.
        let (wide, narrow) = (batch(0, 2000, 400), batch(5000, 2000, 4));
        let (w, n) = (wide.get_array_memory_size(), narrow.get_array_memory_size());
        let budget = 3 * w + 2 * n + n / 2;
        let mut writers = TableWriters::start(
            BTreeMap::from([
                (Table::Observations, held(Table::Observations)),
                (Table::Notes, held(Table::Notes)),
                (Table::Patients, held(Table::Patients)),
            ]),
            budget,
        )
        .expect("start");
        let mut sent: BTreeMap<Table, Vec<RecordBatch>> = BTreeMap::new();
        for i in 0..3 {
            for (table, b) in [
                (Table::Observations, batch(i * 2000, 2000, 400)),
                (Table::Notes, batch(5000 + i * 2000, 2000, 4)),
            ] {
                sent.entry(table).or_default().push(b.clone());
                writers.write(table, b).expect("write");
            }
        }
        let mut written = writers.finish().expect("finish");
        // Observations went over the budget: its file holds every one of its rows, in order.
        let (span, staged) = written.remove(&Table::Observations).expect("observations");
        assert!(matches!(staged, Staged::File), "the largest table spilled");
        assert_eq!(span, (Some("0".into()), Some("5999".into())));
        let path = tmp.path().join("observations.parquet");
        let back: Vec<RecordBatch> = crate::storage::read_encrypted(&path, &key)
            .expect("read")
            .collect::<std::result::Result<_, _>>()
            .expect("batches");
        assert_eq!(rows_of(&back), rows_of(&sent[&Table::Observations]));
        // Notes stayed under it, in memory and in order; patients got nothing and has no file.
        match written.remove(&Table::Notes).expect("notes") {
            (_, Staged::Memory(held)) => {
                assert_eq!(rows_of(&held), rows_of(&sent[&Table::Notes]));
            }
            _ => panic!("notes should stay in memory"),
        }
        assert!(!tmp.path().join("notes.parquet").exists());
        match written.remove(&Table::Patients).expect("patients") {
            (span, Staged::Memory(held)) => {
                assert!(held.is_empty());
                assert_eq!(span, (None, None));
            }
            _ => panic!("patients should stay in memory"),
        }
        assert!(!tmp.path().join("patients.parquet").exists());
        // With no budget, every batch goes straight to its file.
        let mut writers = TableWriters::start(
            BTreeMap::from([(Table::Conditions, held(Table::Conditions))]),
            0,
        )
        .expect("start");
        writers.write(Table::Conditions, narrow).expect("write");
        let mut written = writers.finish().expect("finish");
        assert!(matches!(
            written.remove(&Table::Conditions),
            Some((_, Staged::File))
        ));
        assert!(tmp.path().join("conditions.parquet").exists());
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
