//! The `enclave` command: initialise a data directory, generate demo exports, ingest, inspect the catalog,
//! rotate keys, and benchmark. Run `enclave --help` for the commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use catalog::CatalogStore;
use clap::{Parser, Subcommand};
use enclave::DataDir;
use enclave::ingest::{IngestOptions, ingest};
use enclave_cli::demo::{DemoFormat, DemoOptions};
use enclave_cli::out;
use notebooks_gateway::auth::{Accounts, Role};

/// mimalloc: the ingest's threads hand rows to one another, and glibc's allocator serialises on the
/// frees of memory another thread allocated (DataFusion's own CLI uses mimalloc for the same reasons).
/// Built not to ask for transparent huge pages (`no_thp`): the ingest frees and reuses its batch buffers
/// all the time, and zeroing 2 MiB pages on each fresh fault cost more time and memory than it saved.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "enclave",
    version,
    about = "Privacy-preserving data enclave for hospital real-world data"
)]
struct Cli {
    /// Data directory (database, master key, encrypted datasets).
    #[arg(
        long,
        global = true,
        env = "ENCLAVE_DATA_DIR",
        default_value = "./enclave-data"
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory, its database and a master key (idempotent; never overwrites a key).
    Init {
        /// Also make a self-signed TLS certificate and key for the gateway under `<data-dir>/tls/`
        /// (for localhost, 127.0.0.1, ::1 and each --tls-host), kept if they exist.
        #[arg(long)]
        self_signed: bool,
        /// Another host name or address the self-signed certificate is for.
        #[arg(long = "tls-host", requires = "self_signed")]
        tls_hosts: Vec<String>,
    },
    /// Generate a synthetic hospital export (CSV and/or FHIR R4) with a manifest of planted identifiers.
    DemoData {
        /// Patients to generate.
        #[arg(long, default_value_t = 100)]
        patients: usize,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Formats to write.
        #[arg(long, value_enum, default_value_t = DemoFormat::Both)]
        format: DemoFormat,
        /// Random seed (same seed, same bytes).
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Share of rows to corrupt, e.g. 0.01.
        #[arg(long, default_value_t = 0.0)]
        inject_errors: f64,
    },
    /// De-identify an export under a profile and publish it as an encrypted dataset version.
    Ingest {
        /// Provider (hospital) ID.
        #[arg(long)]
        provider: String,
        /// Dataset name.
        #[arg(long)]
        dataset: String,
        /// Export file or directory (CSV, FHIR Bundle JSON, FHIR NDJSON).
        #[arg(long)]
        input: PathBuf,
        /// Profile: a built-in name (hipaa-safe-harbor, jp-pseudonymized-medical) or a file.
        #[arg(long)]
        profile: String,
        /// Version label (default: the next number).
        #[arg(long)]
        version: Option<String>,
        /// CSV mapping file for layouts other than Synthea's.
        #[arg(long)]
        mapping: Option<PathBuf>,
        /// Fail when more than this share of rows is quarantined (default: the profile's).
        #[arg(long)]
        max_quarantine_ratio: Option<f64>,
        /// Consent scope to record in the catalog.
        #[arg(
            long,
            default_value = "secondary use for research under the profile's legal basis"
        )]
        consent_scope: String,
        /// MiB of de-identified rows held in memory until every table's rows are known; past it the
        /// largest tables are staged as encrypted scratch files and read back once (slower, same output).
        #[arg(long, default_value_t = enclave::ingest::DEFAULT_STAGE_MEMORY >> 20)]
        stage_memory_mib: usize,
        /// Print the report as JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Browse the catalog.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Privacy budgets per principal and dataset.
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// Access requests and grants: researchers ask, board members approve (four-eyes where a dataset
    /// requires it), reject or revoke; an approval sets the researcher's budgets.
    Access {
        #[command(subcommand)]
        command: enclave_cli::access::AccessCommand,
    },
    /// Gateway accounts: an API token and a TOTP secret each (two factors).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Open a gateway session with user, token and the current TOTP code; prints the session secret.
    Login {
        /// User name.
        #[arg(long)]
        user: String,
        /// API token (read from ENCLAVE_TOKEN when not given, so it stays out of the shell history).
        #[arg(long, env = "ENCLAVE_TOKEN", hide_env_values = true)]
        token: String,
        /// The current 6-digit code of the authenticator.
        #[arg(long)]
        totp: String,
        /// Session lifetime in minutes (at most 720).
        #[arg(long, default_value_t = 480)]
        minutes: u64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Run the researchers' gateway: HTTP JSON and Arrow Flight SQL (Postgres wire comes next), with two-factor
    /// sessions, Cedar authorization, the DP engine, budgets and the audit log in front of every query.
    /// Stops on Ctrl-C or SIGTERM; SIGHUP re-reads the policies.
    Serve(ServeArgs),
    /// Cedar authorization policies (`<data-dir>/policies`: the schema and `*.cedar` files).
    Policies {
        #[command(subcommand)]
        command: PoliciesCommand,
    },
    /// The tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Answer one DP aggregate query locally, through the same engine, ledger and audit path as the gateway.
    Sql {
        /// Principal to run as.
        #[arg(long = "as")]
        principal: String,
        /// Dataset.
        #[arg(long)]
        dataset: String,
        /// ε to spend (ρ on zCDP datasets; default 0.1).
        #[arg(long)]
        epsilon: Option<f64>,
        /// δ for private group-key selection (default 1e-6).
        #[arg(long)]
        delta: Option<f64>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// The query.
        sql: String,
    },
    /// Generate demo data, initialise, ingest it, and show the catalog entry: the whole provider flow.
    Demo {
        /// Patients to generate.
        #[arg(long, default_value_t = 200)]
        patients: usize,
        /// Where to write the demo export.
        #[arg(long, default_value = "./demo-export")]
        export_dir: PathBuf,
    },
    /// Benchmarks (print figures; not tests).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// One line per dataset.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// A dataset card: provenance, coverage, tables, columns, de-identification report.
    Show {
        /// Dataset name.
        name: String,
        /// Version (default: latest).
        #[arg(long)]
        version: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Release the latest version's card figures (persons, rows per table, time coverage, histograms of
    /// categorical columns) through the DP engine under a catalog budget of ε that board member --by
    /// grants; once per version. Researchers see only these figures, never exact counts.
    Release {
        /// Dataset name.
        name: String,
        /// ε of the whole release, split over its queries (the coverage query weighs more; at most 10).
        #[arg(long)]
        epsilon: f64,
        /// The board member granting the catalog budget (recorded).
        #[arg(long)]
        by: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// The latest version's metadata as JSON-LD for outside catalogues: HealthDCAT-AP or Croissant 1.0
    /// (with its Responsible-AI fields); counts and coverage are the DP-released card figures, so the
    /// card must have been released (`enclave catalog release`).
    Export {
        /// Dataset name.
        name: String,
        /// `healthdcat-ap` or `croissant`.
        #[arg(long)]
        format: String,
        /// The enclave's public address (distribution access URLs, the access body's page).
        #[arg(long, default_value = "http://localhost:8080/")]
        base_url: String,
    },
    /// For the provider, on the host: the sample of free-text spans the ingest scrubbed, in their
    /// original context (decrypted from the version's review file; it holds identifying text)
    Review {
        /// Dataset name.
        name: String,
        /// Version (default: latest).
        #[arg(long)]
        version: Option<String>,
    },
}

#[derive(Subcommand)]
enum PoliciesCommand {
    /// Validate a policy directory against its schema (strict mode); nonzero exit when it does not.
    Check {
        /// The directory (default: the data directory's `policies`).
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Create an account; prints its API token and TOTP secret once (they are not stored in clear).
    Add {
        /// User name (a-z, 0-9, '.', '_', '-').
        name: String,
        /// researcher, board or provider.
        #[arg(long)]
        role: String,
        /// Who creates it, for the audit log (default: the login name).
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
        /// JSON output (fields user, role, token, totp_secret, otpauth_uri).
        #[arg(long)]
        json: bool,
    },
    /// Every account.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Disable an account and end its sessions.
    Disable {
        /// User name.
        name: String,
        /// Who disables it, for the audit log (default: the login name).
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
    },
}

#[derive(Subcommand)]
enum BudgetCommand {
    /// Grant (or change) a principal's total budget on a dataset; what is spent stays spent.
    Set {
        /// Principal (researcher).
        principal: String,
        /// Dataset.
        dataset: String,
        /// ε granted.
        #[arg(long)]
        epsilon: f64,
        /// δ granted.
        #[arg(long, default_value_t = 1e-6)]
        delta: f64,
        /// ρ granted, for datasets accounted in zCDP.
        #[arg(long)]
        rho: Option<f64>,
        /// When the grant ends: a date (the grant holds through that day, UTC), an RFC 3339 time, or
        /// `never`. Without it a new grant does not end and a changed one keeps its end.
        #[arg(long, value_parser = parse_expiry)]
        expires: Option<Expiry>,
        /// Who grants it, for the audit log (default: the login name).
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
    },
    /// Budgets with what is spent and left.
    Show {
        /// Only this principal.
        principal: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the hash chain, the signatures and the budget totals; name the first bad record.
    Verify {
        /// The audit public key (hex) to verify against (default: the one exported at init).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// A signed head the board kept outside the enclave (`audit head --export`): the log must
        /// still reach it unchanged (detects a log cut short after it).
        #[arg(long)]
        witness: Option<PathBuf>,
        /// A receipt a researcher got with an answer (JSON with seq, hash, signature; repeatable): its
        /// record must be in the log unchanged.
        #[arg(long)]
        receipt: Vec<PathBuf>,
    },
    /// The latest signed head of the log (record number, chain hash, signature), as JSON with the
    /// public key; the board keeps it outside the enclave as a witness of the log's length.
    Head {
        /// Write it to this file (created or replaced) instead of printing it.
        #[arg(long)]
        export: Option<PathBuf>,
        /// The board's previous witness: the log must still hold it (and verify) before a new head is
        /// given out, so a log cut short is never blessed by a fresh witness.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
    /// The latest records.
    Tail {
        /// How many.
        #[arg(short, long, default_value_t = 20)]
        n: usize,
        /// JSON output (one object per line).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-wrap every data key and the linkage key under a new master key.
    Rotate,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Ingest throughput and memory against plain Parquet writing of the same rows.
    Ingest {
        /// Patients to generate (about 60 observation rows each; 17000 ≈ 1M observations).
        #[arg(long, default_value_t = 17_000)]
        patients: usize,
        /// Work directory (default: a temporary one).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Runs of each phase at each size; the fastest counts (other load on the machine only ever
        /// slows a run down).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The DP engine against plain DataFusion on the same rows, and against SmartNoise SQL.
    Dp {
        /// Patients to generate (about 60 observation rows each; 170000 ≈ 10M observations).
        #[arg(long, default_value_t = 170_000)]
        patients: usize,
        /// Work directory (kept between runs, so data is generated and ingested once).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Runs per query (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Also compare with SmartNoise SQL (creates a Python venv under ~/.cache and pip-installs it).
        #[arg(long)]
        smartnoise: bool,
    },
    /// The gateway under load: 20 users × 10 concurrent Flight SQL clients, 2,000 queries, against plain
    /// DataFusion behind Flight SQL; checks no budget is overspent and one audit record per query.
    Gateway {
        /// Work directory (the export is kept between runs; the data directory is made afresh).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// The web UI's pages served in-process over TCP: median and slowest load per page on a dataset of
    /// 10 tables and an audit log of 10,000 records (target: under 100 ms).
    Ui {
        /// Work directory (its data directory is made afresh each run).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Audit records to append before measuring.
        #[arg(long, default_value_t = 10_000)]
        records: usize,
    },
    /// DP answers against the true and the bounded value: bias, standard deviation and RMSE at ε = 1.
    Accuracy {
        /// Work directory (kept between runs, so data is generated and ingested once).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Runs per query.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENCLAVE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => match enclave_cli::output_lost() {
            None => ExitCode::SUCCESS,
            // The command did all it does; what it printed (a new account's secrets, an answer) did not
            // all reach anyone. A closed pipe exits as a process killed by SIGPIPE would (128 + 13).
            Some(closed) => {
                eprintln!(
                    "error: the command completed, but its output {}: what it printed after that point is lost",
                    if closed {
                        "was closed by its reader"
                    } else {
                        "could not be written"
                    }
                );
                ExitCode::from(if closed { 141 } else { 1 })
            }
        },
        Err(e) => {
            eprintln!("error: {e:#}");
            // A refusal the audit log holds: its signed receipt, to keep (`audit verify --receipt`).
            if let Some(json) = receipt_of(&e).and_then(|r| serde_json::to_string(r).ok()) {
                eprintln!("receipt: {json}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The receipt a refusal carries, when its record is on the audit log.
fn receipt_of(e: &anyhow::Error) -> Option<&enclave::audit::SignedHead> {
    if let Some(enclave::Error::Refused { receipt, .. }) = e.downcast_ref::<enclave::Error>() {
        return receipt.as_deref();
    }
    e.downcast_ref::<notebooks_gateway::auth::AuthError>()
        .and_then(notebooks_gateway::auth::AuthError::receipt)
}

fn run(cli: Cli) -> Result<()> {
    let dir = DataDir::new(&cli.data_dir);
    match cli.command {
        Command::Init {
            self_signed,
            tls_hosts,
        } => {
            for line in dir.init()? {
                out!("{line}");
            }
            // The gateway's Cedar policies, to edit in place (edited ones are kept; see write_defaults).
            for line in notebooks_gateway::authz::write_defaults(&dir.root().join("policies"))? {
                out!("{line}");
            }
            if self_signed {
                let (cert, key, made) =
                    notebooks_gateway::tls::self_signed(&dir.root().join("tls"), &tls_hosts)?;
                out!(
                    "{} self-signed TLS certificate {} (key {}): enclave serve --tls-cert {} --tls-key {}",
                    if made { "made a" } else { "kept the" },
                    cert.display(),
                    key.display(),
                    cert.display(),
                    key.display()
                );
            }
            out!("data directory {} is ready", dir.root().display());
        }
        Command::DemoData {
            patients,
            out,
            format,
            seed,
            inject_errors,
        } => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&inject_errors),
                "--inject-errors must be within 0..=1"
            );
            let m = enclave_cli::demo::generate(&DemoOptions {
                patients,
                out: out.clone(),
                format,
                seed,
                inject_errors,
                today: demo_today(),
            })?;
            let rows: Vec<String> = m.rows.iter().map(|(t, n)| format!("{t} {n}")).collect();
            out!(
                "wrote {} patients to {}: {}",
                m.patients,
                out.display(),
                rows.join(", ")
            );
            if !m.injected_errors.is_empty() {
                let e: Vec<String> = m
                    .injected_errors
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                out!("injected errors: {}", e.join(", "));
            }
            out!("manifest: {}", out.join("manifest.json").display());
        }
        Command::Ingest {
            provider,
            dataset,
            input,
            profile,
            version,
            mapping,
            max_quarantine_ratio,
            consent_scope,
            stage_memory_mib,
            json,
        } => {
            let keystore = dir.keystore()?;
            let catalog = dir.catalog()?;
            let opts = IngestOptions {
                version,
                mapping,
                max_quarantine_ratio,
                consent_scope,
                progress: true,
                stage_memory: stage_memory_mib.saturating_mul(1 << 20),
                ..IngestOptions::new(&provider, &dataset, input, &profile)
            };
            let report = ingest(&dir, &keystore, &catalog, &opts)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                out!(no_newline; "{}", report.summary());
            }
        }
        Command::Catalog { command } => catalog_command(&dir, command)?,
        Command::Keys {
            command: KeysCommand::Rotate,
        } => {
            let mut ks = dir.keystore()?;
            let before = ks.master_fingerprint();
            let n = ks.rotate()?;
            out!(
                "re-wrapped {n} keys: master key {before} → {}",
                ks.master_fingerprint()
            );
        }
        Command::Sql {
            principal,
            dataset,
            epsilon,
            delta,
            json,
            sql,
        } => {
            #[allow(unused_mut)]
            let mut engine = enclave::dp::DpEngine::open(&dir)?;
            // Fault injection for the crash test: only in builds with the test feature.
            #[cfg(feature = "danger-test-hooks")]
            if std::env::var_os("ENCLAVE_DANGER_CRASH_AFTER_CHARGE").is_some() {
                engine = engine.danger_crash_after_charge();
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let options = enclave::dp::QueryOptions {
                epsilon,
                delta,
                via: enclave::audit::Via::local("cli --as"),
                ..Default::default()
            };
            let answer = match rt.block_on(engine.answer(&principal, &dataset, &sql, &options)) {
                Ok(answer) => answer,
                Err(e) => {
                    // `--json` callers get the refusal as JSON too (its receipt included).
                    if json {
                        let body = match &e {
                            enclave::Error::Refused {
                                rule,
                                message,
                                receipt,
                            } => serde_json::json!({
                                "rule": rule.name(), "message": message, "receipt": receipt
                            }),
                            enclave::Error::Access { rule, message } => {
                                serde_json::json!({"rule": rule.name(), "message": message})
                            }
                            other => {
                                serde_json::json!({"rule": "error", "message": other.to_string()})
                            }
                        };
                        out!(
                            "{}",
                            serde_json::to_string_pretty(&serde_json::json!({ "error": body }))?
                        );
                    }
                    return Err(e.into());
                }
            };
            print_answer(&answer, json)?;
        }
        Command::Budget { command } => budget_command(&dir, command)?,
        Command::Users { command } => users_command(&dir, command)?,
        Command::Access { command } => enclave_cli::access::run(&dir, command)?,
        Command::Policies {
            command: PoliciesCommand::Check { dir: policy_dir },
        } => {
            let policy_dir = policy_dir.unwrap_or_else(|| dir.root().join("policies"));
            let store = notebooks_gateway::authz::PolicyStore::from_dir(&policy_dir)?;
            out!(
                "{}: the policies validate against the schema: {}",
                policy_dir.display(),
                store.ids().join(", ")
            );
        }
        Command::Login {
            user,
            token,
            totp,
            minutes,
            json,
        } => {
            let accounts = Accounts::open(
                &dir,
                std::time::Duration::from_secs(minutes.saturating_mul(60)),
            )?;
            let s = accounts.sign_in(
                &user,
                &token,
                &totp,
                "local",
                "cli",
                std::time::SystemTime::now(),
            )?;
            if json {
                out!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                out!(
                    "session {} (id {}), expires {}",
                    s.session,
                    s.id,
                    s.expires_at
                );
            }
        }
        Command::Audit { command } => audit_command(&dir, command)?,
        Command::Serve(args) => serve(&dir, args)?,
        Command::Demo {
            patients,
            export_dir,
        } => {
            let m = enclave_cli::demo::generate(&DemoOptions {
                patients,
                out: export_dir.clone(),
                format: DemoFormat::Both,
                seed: 42,
                inject_errors: 0.0,
                today: demo_today(),
            })?;
            out!(
                "1/4 generated {} synthetic patients in {}",
                m.patients,
                export_dir.display()
            );
            dir.init()?;
            for line in notebooks_gateway::authz::write_defaults(&dir.root().join("policies"))? {
                out!("{line}");
            }
            out!("2/4 data directory {} ready", dir.root().display());
            let keystore = dir.keystore()?;
            let catalog = dir.catalog()?;
            let version = catalog.next_version_label("demo-cohort")?;
            let opts = IngestOptions {
                version: Some(version),
                consent_scope: "synthetic demo data".into(),
                progress: true,
                ..IngestOptions::new(
                    "riverside-general",
                    "demo-cohort",
                    export_dir.join("csv"),
                    "hipaa-safe-harbor",
                )
            };
            let report = ingest(&dir, &keystore, &catalog, &opts)?;
            out!("3/4 ingested:\n{}", report.summary());
            out!("4/4 catalog entry:\n");
            print_card(&catalog.version("demo-cohort", None)?);
        }
        Command::Bench { command } => match command {
            BenchCommand::Gateway { work_dir } => {
                enclave_cli::bench_gateway::gateway_bench(work_dir)?
            }
            BenchCommand::Ui { work_dir, records } => {
                enclave_cli::bench_ui::ui_bench(work_dir, records)?
            }
            BenchCommand::Ingest {
                patients,
                work_dir,
                runs,
            } => enclave_cli::bench::ingest_bench(patients, work_dir, runs, demo_today())?,
            BenchCommand::Dp {
                patients,
                work_dir,
                runs,
                smartnoise,
            } => enclave_cli::bench::dp_bench(patients, work_dir, runs, smartnoise, demo_today())?,
            BenchCommand::Accuracy { work_dir, runs } => {
                enclave_cli::bench::accuracy_bench(work_dir, runs)?
            }
        },
    }
    Ok(())
}

/// Demo data is generated relative to a fixed day, so the same seed gives the same export on any day.
fn demo_today() -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap_or_default()
}

fn catalog_command(dir: &DataDir, command: CatalogCommand) -> Result<()> {
    let catalog = dir.catalog()?;
    match command {
        CatalogCommand::List { json } => {
            let list = catalog.list()?;
            if json {
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                out!("no datasets yet: ingest one with `enclave ingest`");
            } else {
                out!(
                    "{:<24} {:>8} {:>8} {:>9} {:>11}  providers",
                    "dataset",
                    "versions",
                    "latest",
                    "persons",
                    "rows"
                );
                for d in list {
                    out!(
                        "{:<24} {:>8} {:>8} {:>9} {:>11}  {}",
                        d.name,
                        d.versions,
                        d.latest,
                        d.persons,
                        d.rows,
                        d.providers.join(", ")
                    );
                }
            }
        }
        CatalogCommand::Review { name, version } => {
            let v = catalog
                .version(&name, version.as_deref())
                .with_context(|| format!("catalog review {name}"))?;
            let path = dir
                .root()
                .join(&v.version.storage_path)
                .join(enclave::ingest::REVIEW_FILE);
            let key = dir.keystore()?.get(&v.version.key_id)?;
            let mut shown = 0;
            for batch in enclave::storage::read_encrypted(&path, &key)
                .with_context(|| format!("{name}@{} has no review file", v.version.version))?
            {
                let batch = batch?;
                let col = |i: usize| {
                    batch
                        .column(i)
                        .as_any()
                        .downcast_ref::<arrow::array::StringArray>()
                        .cloned()
                };
                let (Some(table), Some(kind), Some(found), Some(before), Some(after)) =
                    (col(0), col(1), col(2), col(3), col(4))
                else {
                    anyhow::bail!("the review file of {name} is not in the expected layout");
                };
                for r in 0..batch.num_rows() {
                    out!(
                        "[{}] {}: …{}⟦{}⟧{}…",
                        kind.value(r),
                        table.value(r),
                        before.value(r).replace('\n', " "),
                        found.value(r),
                        after.value(r).replace('\n', " ")
                    );
                    shown += 1;
                }
            }
            eprintln!(
                "{shown} scrubbed spans of {name}@{} (a sample per placeholder type)",
                v.version.version
            );
        }
        CatalogCommand::Show {
            name,
            version,
            json,
        } => {
            let v = catalog
                .version(&name, version.as_deref())
                .with_context(|| format!("catalog show {name}"))?;
            if json {
                out!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_card(&v);
                if let Some(r) = catalog.card_release(&name, &v.version.version)? {
                    print_release(&r);
                }
            }
        }
        CatalogCommand::Export {
            name,
            format,
            base_url,
        } => {
            let format = enclave::metadata::Format::parse(&format)?;
            let v = catalog
                .version(&name, None)
                .with_context(|| format!("catalog export {name}"))?;
            let release = catalog
                .card_release(&name, &v.version.version)?
                .with_context(|| {
                    format!(
                        "the card of '{name}' version {} is not released yet: its counts would be exact (run `enclave catalog release {name} --epsilon … --by …` first)",
                        v.version.version
                    )
                })?;
            let figures = enclave::card::figures(&release)
                .context("the released card figures cannot be read")?;
            let doc = enclave::metadata::export(
                &v,
                &release,
                &figures,
                &enclave::metadata::Publisher { base_url },
                format,
            )?;
            out!("{}", serde_json::to_string_pretty(&doc)?);
        }
        CatalogCommand::Release {
            name,
            epsilon,
            by,
            json,
        } => {
            let engine = enclave::dp::DpEngine::open(dir)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let release = rt.block_on(enclave::card::release(
                &engine,
                &catalog,
                &name,
                &by,
                epsilon,
                &enclave::audit::Via::local("cli"),
            ))?;
            if json {
                out!("{}", serde_json::to_string_pretty(&release)?);
            } else {
                print_release(&release);
            }
        }
    }
    Ok(())
}

/// A card release: each figure with its 95 % interval and noise scale.
fn print_release(r: &catalog::CardRelease) {
    let Some(f) = enclave::card::figures(r) else {
        return;
    };
    let show = |fig: &enclave::card::Figure| {
        format!(
            "{:.0}  (95 % interval {:.0}–{:.0}, noise scale {:.1})",
            fig.value, fig.low, fig.high, fig.scale
        )
    };
    out!(
        "\nDP-released figures (version {}, ε {} over {} queries, released by {} at {})",
        r.version,
        f.epsilon,
        f.queries,
        r.released_by,
        r.released_at
    );
    if let Some(p) = &f.persons {
        out!("  persons        {}", show(p));
    }
    if let Some(all) = &f.records {
        out!("  records        {}", show(all));
    }
    for (table, fig) in &f.rows {
        out!("  rows {table:<10} {}", show(fig));
    }
    if let Some(c) = &f.coverage {
        out!(
            "  coverage       {} … {} ({}.{})",
            c.first_year,
            c.last_year,
            c.table,
            c.column
        );
    }
    for h in &f.histograms {
        out!("  {}.{}:", h.table, h.column);
        for (value, fig) in &h.bins {
            out!("    {value:<24} {}", show(fig));
        }
    }
    for s in &f.skipped {
        out!("  not released: {s}");
    }
}

fn print_answer(a: &enclave::dp::DpAnswer, json: bool) -> Result<()> {
    use std::fmt::Write as _;
    let mut out = String::new();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&a.to_json())?)?;
        out!(no_newline; "{out}");
        return Ok(());
    }
    let schema = a.batch.schema();
    let rows = a.rows();
    let mut header: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    for n in &a.noise {
        header.push(format!("{} 95% CI", n.column));
    }
    writeln!(out, "{}", header.join(" | "))?;
    for (r, row) in rows.iter().enumerate() {
        let mut cells: Vec<String> = row
            .iter()
            .map(|v| {
                v.as_ref()
                    .map_or("NULL".into(), |x| match x.parse::<f64>() {
                        Ok(f) if x.contains('.') => format!("{f:.3}"),
                        _ => x.clone(),
                    })
            })
            .collect();
        for n in &a.noise {
            let (lo, hi) = n.intervals[r];
            cells.push(if lo.is_nan() {
                "n/a".into()
            } else {
                format!("[{lo:.3}, {hi:.3}]")
            });
        }
        writeln!(out, "{}", cells.join(" | "))?;
    }
    writeln!(out, "({} rows)", rows.len())?;
    for line in a.summary_lines() {
        writeln!(out, "{line}")?;
    }
    out!(no_newline; "{out}");
    Ok(())
}

fn users_command(dir: &DataDir, command: UsersCommand) -> Result<()> {
    let accounts = Accounts::open(dir, std::time::Duration::from_secs(8 * 3600))?;
    match command {
        UsersCommand::Add {
            name,
            role,
            by,
            json,
        } => {
            let new = accounts.add(&by, &name, Role::parse(&role)?)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&new)?);
            } else {
                out!(
                    "user {} ({}) created; shown once, store them now:",
                    new.user,
                    role
                );
                out!("  API token:   {}", new.token);
                out!("  TOTP secret: {}", new.totp_secret);
                out!("  {}", new.otpauth_uri);
            }
        }
        UsersCommand::List { json } => {
            let users = accounts.list()?;
            if json {
                out!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                for u in users {
                    out!(
                        "{:<24} {:<11} {:<9} created {} by {}",
                        u.user,
                        u.role,
                        if u.disabled { "disabled" } else { "active" },
                        u.created_at,
                        u.created_by
                    );
                }
            }
        }
        UsersCommand::Disable { name, by } => {
            accounts.disable(&by, &name)?;
            out!("user {name} disabled; its sessions are closed");
        }
    }
    Ok(())
}

/// A grant's end as `--expires` gives it.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    /// The grant does not end.
    Never,
    /// It ends at this time.
    At(chrono::DateTime<chrono::Utc>),
}

/// `--expires`: a date (the grant holds through that day, UTC, so it ends at the next midnight), an
/// RFC 3339 time, or `never`.
fn parse_expiry(s: &str) -> std::result::Result<Expiry, String> {
    if s == "never" {
        return Ok(Expiry::Never);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(Expiry::At(t.with_timezone(&chrono::Utc)));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.succ_opt())
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| Expiry::At(t.and_utc()))
        .ok_or_else(|| {
            format!("{s:?} is neither a date (YYYY-MM-DD), an RFC 3339 time, nor `never`")
        })
}

/// `enclave serve`'s options.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// HTTP JSON listener address, or `off`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// Arrow Flight SQL listener address, or `off`.
    #[arg(long, default_value = "127.0.0.1:8815")]
    flight: String,
    /// Postgres wire listener address, or `off`.
    #[arg(long, default_value = "127.0.0.1:5433")]
    pg: String,
    /// Session lifetime in minutes (at most 720).
    #[arg(long, default_value_t = 480)]
    session_minutes: u64,
    /// Per-query time limit in seconds (a query stopped after it started running is charged).
    #[arg(long, default_value_t = 60)]
    query_timeout: u64,
    /// Most rows one answer may release.
    #[arg(long, default_value_t = 10_000)]
    max_groups: usize,
    /// Queries one user may have running at once.
    #[arg(long, default_value_t = 4)]
    per_user: usize,
    /// Queries running at once over all users.
    #[arg(long, default_value_t = 64)]
    total: usize,
    /// Largest request body or SQL text, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_request_bytes: usize,
    /// Memory one query may use, in MiB (a query that needs more stops and is charged; nothing
    /// spills to disk).
    #[arg(long, default_value_t = 2048)]
    query_memory_mb: usize,
    /// Seconds a client may take to send a request's headers or body before it is cut (slow clients).
    #[arg(long, default_value_t = 10)]
    read_timeout: u64,
    /// TLS certificate chain (PEM) for every listener; with --tls-key (`enclave init --self-signed`
    /// makes a local pair).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The address users open the web UI at (`https://HOST[:PORT]/`); passkeys are bound to its host.
    /// Default: `http(s)://localhost:<http port>/`.
    #[arg(long)]
    public_url: Option<String>,
    /// Allow listening on a non-loopback address without TLS (sessions and tokens then cross the network
    /// in the clear: only behind a TLS-terminating proxy on the same host).
    #[arg(long)]
    danger_allow_plaintext: bool,
}

/// Parses a listener address (`off` → none); a non-loopback one needs TLS (or `--danger-allow-plaintext`).
fn listen_addr(
    what: &str,
    value: &str,
    allow_plaintext: bool,
) -> Result<Option<std::net::SocketAddr>> {
    if value == "off" {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = value.parse().map_err(|_| {
        anyhow::anyhow!("--{what} {value:?}: give ADDRESS:PORT (e.g. 127.0.0.1:8080) or off")
    })?;
    if !addr.ip().is_loopback() && !allow_plaintext {
        anyhow::bail!(
            "--{what} {addr}: a non-loopback address needs TLS (--tls-cert and --tls-key; or --danger-allow-plaintext behind a TLS-terminating proxy)"
        );
    }
    Ok(Some(addr))
}

fn serve(dir: &DataDir, args: ServeArgs) -> Result<()> {
    use notebooks_gateway::service::{Gateway, Limits};
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(notebooks_gateway::tls::Tls::load(cert, key)?),
        _ => None,
    };
    let plaintext_ok = args.danger_allow_plaintext || tls.is_some();
    let http = listen_addr("http", &args.http, plaintext_ok)?;
    let flight = listen_addr("flight", &args.flight, plaintext_ok)?;
    let pg = listen_addr("pg", &args.pg, plaintext_ok)?;
    let acceptor = |alpn: &[u8]| -> Result<_> {
        Ok(match &tls {
            Some(t) => Some(t.acceptor(alpn)?),
            None => None,
        })
    };
    let (http_tls, flight_tls, pg_tls) = (
        acceptor(b"http/1.1")?,
        acceptor(b"h2")?,
        acceptor(b"postgresql")?,
    );
    let scheme = if tls.is_some() { " (tls)" } else { "" };
    let limits = Limits {
        query_timeout: std::time::Duration::from_secs(args.query_timeout.max(1)),
        max_groups: args.max_groups.max(1),
        per_user: args.per_user.max(1),
        total: args.total.max(1),
        max_request_bytes: args.max_request_bytes.max(1024),
        read_timeout: std::time::Duration::from_secs(args.read_timeout.max(1)),
        query_memory: args.query_memory_mb.clamp(16, 1 << 20) * 1024 * 1024,
    };
    // A data directory made by an earlier version: its untouched policies are brought up to date.
    let policy_dir = dir.root().join("policies");
    if policy_dir.is_dir() {
        for line in notebooks_gateway::authz::write_defaults(&policy_dir)? {
            eprintln!("policies: {line}");
        }
    }
    let gateway = std::sync::Arc::new(Gateway::open(
        dir,
        limits,
        std::time::Duration::from_secs(args.session_minutes.saturating_mul(60)),
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        // Every listener is bound before any serves, so the web UI knows where to send researchers.
        let bind = |name: &'static str, addr: Option<std::net::SocketAddr>| async move {
            match addr {
                None => Ok(None),
                Some(addr) => tokio::net::TcpListener::bind(addr)
                    .await
                    .map(Some)
                    .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {name}: {e}")),
            }
        };
        let http = bind("http", http).await?;
        let flight = bind("flight", flight).await?;
        let pg = bind("pg", pg).await?;
        let bound =
            |l: &Option<tokio::net::TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        let endpoints = notebooks_gateway::web::Endpoints {
            tls: http_tls.is_some(),
            http: bound(&http),
            flight: bound(&flight),
            pg: bound(&pg),
        };
        if let Some(addr) = endpoints.http {
            let url = args.public_url.clone().unwrap_or_else(|| {
                format!(
                    "{}://localhost:{}/",
                    if endpoints.tls { "https" } else { "http" },
                    addr.port()
                )
            });
            gateway.accounts().enable_passkeys(&url)?;
        }
        if let Some(listener) = http {
            // Tests and scripts read the bound address (port 0 picks a free one) from this line.
            out!("listening: http on {}{scheme}", listener.local_addr()?);
            let mut stop = stop_rx.clone();
            let g = gateway.clone();
            tasks.push(tokio::spawn(async move {
                notebooks_gateway::http::serve(listener, g, http_tls, endpoints, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            }));
        }
        if let Some(listener) = flight {
            out!("listening: flight on {}{scheme}", listener.local_addr()?);
            let mut stop = stop_rx.clone();
            let g = gateway.clone();
            tasks.push(tokio::spawn(async move {
                let served =
                    notebooks_gateway::flight::serve(listener, g, flight_tls, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = served {
                    eprintln!("flight listener stopped: {e}");
                }
            }));
        }
        if let Some(listener) = pg {
            out!("listening: pg on {}{scheme}", listener.local_addr()?);
            let mut stop = stop_rx.clone();
            let g = gateway.clone();
            tasks.push(tokio::spawn(async move {
                notebooks_gateway::pg::serve(listener, g, pg_tls, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            }));
        }
        if tasks.is_empty() {
            anyhow::bail!("every listener is off: nothing to serve");
        }
        // Nobody reading the log is no reason to stop serving (`out!` keeps going too).
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    gateway.policies().reload();
                    eprintln!("SIGHUP: policies re-read");
                }
                _ = terminate.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        eprintln!("gateway stopped");
        Ok(())
    })
}

fn budget_command(dir: &DataDir, command: BudgetCommand) -> Result<()> {
    let keystore = dir.keystore()?;
    let ledger = dir.ledger(&keystore)?;
    match command {
        BudgetCommand::Set {
            principal,
            dataset,
            epsilon,
            delta,
            rho,
            expires,
            by,
        } => {
            // Fail closed: a budget only exists for a dataset the catalog knows.
            dir.catalog()?.version(&dataset, None)?;
            // A changed grant keeps its end unless --expires says otherwise.
            let expires = match expires {
                Some(Expiry::Never) => None,
                Some(Expiry::At(t)) => Some(t),
                None => ledger
                    .budget(&principal, &dataset)?
                    .and_then(|b| b.expires_at)
                    .map(|t| chrono::DateTime::parse_from_rfc3339(&t))
                    .transpose()
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "the stored end of this grant does not parse; give --expires"
                        )
                    })?
                    .map(|t| t.with_timezone(&chrono::Utc)),
            };
            let b =
                ledger.set_budget_until(&by, &principal, &dataset, epsilon, delta, rho, expires)?;
            out!(
                "{} on {}: ε {} (spent {}), δ {:e} (spent {:e}){}{}",
                b.principal,
                b.dataset,
                b.epsilon,
                b.spent_epsilon,
                b.delta,
                b.spent_delta,
                b.rho
                    .map(|r| format!(", ρ {r} (spent {})", b.spent_rho))
                    .unwrap_or_default(),
                b.expires_at
                    .map(|t| format!(", until {t}"))
                    .unwrap_or_default()
            );
        }
        BudgetCommand::Show { principal, json } => {
            let budgets = ledger.budgets(principal.as_deref())?;
            if json {
                out!("{}", serde_json::to_string_pretty(&budgets)?);
            } else if budgets.is_empty() {
                out!(
                    "no budgets yet: grant one with `enclave budget set PRINCIPAL DATASET --epsilon E`"
                );
            } else {
                out!(
                    "{:<20} {:<20} {:>10} {:>10} {:>10} {:>10} {:>10}  until",
                    "principal",
                    "dataset",
                    "ε",
                    "ε spent",
                    "ε left",
                    "δ",
                    "δ spent"
                );
                for b in budgets {
                    out!(
                        "{:<20} {:<20} {:>10.4} {:>10.4} {:>10.4} {:>10.2e} {:>10.2e}  {}",
                        b.principal,
                        b.dataset,
                        b.epsilon,
                        b.spent_epsilon,
                        b.epsilon_left(),
                        b.delta,
                        b.spent_delta,
                        b.expires_at.as_deref().unwrap_or("-")
                    );
                }
            }
        }
    }
    Ok(())
}

/// The audit public key (hex) from `path`, or the one exported at init.
fn audit_public_key(dir: &DataDir, path: Option<PathBuf>) -> Result<String> {
    let path = path.unwrap_or_else(|| dir.audit_public_key_path());
    let pk = std::fs::read_to_string(&path)
        .with_context(|| format!("read the audit public key {}", path.display()))?;
    Ok(pk.trim().to_owned())
}

/// A signed head (a witness or a receipt) from its JSON file.
fn read_head(what: &str, path: &PathBuf) -> Result<enclave::audit::SignedHead> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read the {what} {}", path.display()))?;
    Ok(enclave::audit::SignedHead::from_json(&text)?)
}

fn audit_command(dir: &DataDir, command: AuditCommand) -> Result<()> {
    let keystore = dir.keystore()?;
    let ledger = dir.ledger(&keystore)?;
    match command {
        AuditCommand::Verify {
            public_key,
            witness,
            receipt,
        } => {
            let pk = audit_public_key(dir, public_key)?;
            let mut checked = Vec::new();
            if let Some(w) = &witness {
                let head = read_head("witness", w)?;
                ledger.verify_head(pk.trim(), &head)?;
                checked.push(format!("the board's witness (record {})", head.seq));
            }
            for r in &receipt {
                let head = read_head("receipt", r)?;
                ledger.verify_head(pk.trim(), &head)?;
                checked.push(format!("receipt of record {}", head.seq));
            }
            let v = ledger.verify(pk.trim())?;
            out!(
                "audit log verifies: {} records, {} signed heads{}",
                v.records,
                v.checkpoints,
                v.last_checkpoint
                    .map(|s| format!(" (last at record {s})"))
                    .unwrap_or_default()
            );
            for c in checked {
                out!("  and holds {c}");
            }
        }
        AuditCommand::Head { export, previous } => {
            // Only a log that verifies (and still holds the previous witness) gets its head handed out.
            let pk = audit_public_key(dir, None)?;
            if let Some(p) = &previous {
                ledger.verify_head(pk.trim(), &read_head("previous witness", p)?)?;
            }
            ledger.verify(pk.trim())?;
            let head = ledger
                .head()?
                .context("the audit log is empty: there is no head to hand out yet")?;
            let mut json = serde_json::to_value(&head)?;
            json["public_key"] = ledger.public_key_hex().into();
            let text = serde_json::to_string_pretty(&json)? + "\n";
            match export {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("write {}", path.display()))?;
                    out!(
                        "signed head of record {} written to {}: keep it outside the enclave, and check \
                         the log against it with `enclave audit verify --witness {}`",
                        head.seq,
                        path.display(),
                        path.display()
                    );
                }
                None => out!(no_newline; "{text}"),
            }
        }
        AuditCommand::Tail { n, json } => {
            for r in ledger.tail(n)? {
                if json {
                    out!("{}", serde_json::to_string(&r)?);
                } else {
                    let cost = enclave::audit::from_units(r.cost_epsilon);
                    let what = match r.outcome.as_str() {
                        "released" => format!("released, ε {cost}"),
                        "failed" => format!("failed while running, charged ε {cost}"),
                        "granted" => format!("granted ε {cost} ({})", r.rule),
                        other => format!("{other} ({})", r.rule),
                    };
                    let on = if r.draft.dataset.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " on {}@{}: {}\n        {}",
                            r.draft.dataset, r.draft.version, r.draft.plan_hash, r.draft.sql
                        )
                    };
                    let v = &r.draft.via;
                    let mut via = v.origin.clone();
                    for (label, value) in [("from", &v.peer), ("session", &v.session)] {
                        if !value.is_empty() {
                            via.push_str(&format!(" {label} {value}"));
                        }
                    }
                    let decided = if v.decision.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", v.decision)
                    };
                    out!(
                        "#{:<6} {} {} via {via} {what}{decided}{on}",
                        r.seq,
                        r.at,
                        r.draft.principal
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_card(v: &catalog::VersionEntry) {
    let e = &v.version;
    let p = &e.provenance;
    out!(
        "dataset      {} (version {}, published {})",
        e.dataset,
        e.version,
        v.published_at
    );
    out!(
        "provider     {} — source {} extracted {}",
        p.provider,
        p.source_system,
        p.extracted_at
    );
    out!("profile      {}", p.profile);
    out!("legal basis  {}", p.legal_basis);
    out!("consent      {}", p.consent_scope);
    out!(
        "coverage     {} persons, {} … {}",
        e.coverage.persons,
        e.coverage.time_start.as_deref().unwrap_or("?"),
        e.coverage.time_end.as_deref().unwrap_or("?")
    );
    out!(
        "DP           at most {} rows per person per query",
        e.max_contributions
    );
    for t in &e.tables {
        out!("\n  {} ({} rows)", t.name, t.rows);
        for c in &t.columns {
            let bounds = match (c.lower, c.upper) {
                (Some(l), Some(u)) => format!("  bounds [{l}, {u}]"),
                _ => String::new(),
            };
            out!(
                "    {:<22} {:<26} {:<17} {}{}",
                c.name,
                c.data_type,
                c.role,
                c.action,
                bounds
            );
        }
    }
    if let Some(summary) = e.report.get("totals") {
        out!("\nrows: {summary}");
    }
}
