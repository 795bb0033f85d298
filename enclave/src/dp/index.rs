//! The per-person contribution index: each table of a version, again, with every row carrying how many
//! rows its person has in that table and the weight that bounds the person to the table's `k` rows (its
//! declared rows per person, else the version's `max_contributions`).
//!
//! Bounding by weight needs each person's row count in the query's relation. For a query without WHERE
//! that count is a property of the version (a join on `person_id` multiplies the tables' counts), so it
//! is computed once, on the first query that needs it, and kept beside the version under
//! `contributions/k<k>/`: encrypted Parquet under the version's own data key, written to a temporary name,
//! fsynced and renamed, so a crash or a concurrent builder never leaves a partial index. It is a cache:
//! deleting it costs one rebuild. Researchers cannot name its column (it is not in the catalog).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use catalog::VersionEntry;
use futures::StreamExt;

use crate::keys::Keystore;
use crate::storage::EncryptedWriter;
use crate::{Error, Result};

/// The column holding the person's row count in the table.
pub(crate) const ROWS_COLUMN: &str = "__rows_of_person";
/// The column holding the row's weight, `min(1, k / rows of person)` for the table's `k`.
pub(crate) const WEIGHT_COLUMN: &str = "__weight";

/// One build at a time in this process (others wait, then find it built).
static BUILDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The indexed copy of `table` in `version` (under `root`), built first if missing.
pub(crate) async fn ensure(
    root: &Path,
    version: &VersionEntry,
    table: &str,
    keystore: &Arc<Keystore>,
) -> Result<PathBuf> {
    let vdir = root.join(&version.version.storage_path);
    let entry = version
        .version
        .table(table)
        .ok_or_else(|| Error::Internal(format!("table {table} vanished")))?;
    let k = version.version.contribution_bound(table);
    let dir = vdir.join("contributions").join(format!("k{k}"));
    let target = dir.join(format!("{table}.parquet"));
    if target.exists() {
        return Ok(target);
    }
    let _one = BUILDING.lock().await;
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let started = std::time::Instant::now();
    let ctx = crate::storage::session(keystore.clone())?;
    crate::storage::register_table(&ctx, "__src", &vdir.join(&entry.file)).await?;
    let df = ctx
        .sql(&format!(
            "SELECT s.*, CAST(c.__pn AS INT) AS {ROWS_COLUMN}, \
             CASE WHEN c.__pn <= {k} THEN 1.0 ELSE {k}.0 / CAST(c.__pn AS DOUBLE) END AS {WEIGHT_COLUMN} \
             FROM __src AS s \
             JOIN (SELECT person_id AS __p, COUNT(*) AS __pn FROM __src GROUP BY person_id) AS c \
             ON s.person_id = c.__p"
        ))
        .await?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let key = keystore.get(&version.version.key_id)?;
    let tmp = dir.join(format!(
        ".{table}.{}.{}.tmp",
        std::process::id(),
        crate::datadir::random_name_part()?
    ));
    let result = async {
        let mut writer = EncryptedWriter::create(&tmp, schema, &version.version.key_id, &key)?;
        let mut stream = df.execute_stream().await?;
        while let Some(batch) = stream.next().await {
            writer.write(&batch?)?;
        }
        let rows = writer.finish()?;
        std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
        crate::ingest::sync_dir(&dir)?;
        Ok::<u64, Error>(rows)
    }
    .await;
    match result {
        Ok(rows) => {
            tracing::info!(
                table,
                rows,
                seconds = started.elapsed().as_secs_f64(),
                "built the per-person contribution index"
            );
            Ok(target)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
