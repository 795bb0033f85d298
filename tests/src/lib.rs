//! Helpers for the end-to-end tests in `tests/tests/`: run the real `enclave` binary, read its encrypted
//! output back through DataFusion, and load the demo manifest. The tests themselves are the point.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `enclave` binary built alongside the tests.
pub fn enclave_bin() -> PathBuf {
    // tests/ is a workspace member; the binary lives in the shared target directory.
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/enclave (built because `enclave` has integration tests).
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    dir.join("enclave")
}

/// Runs `enclave` with `args` in `cwd`; panics with its output when it fails.
pub fn enclave(cwd: &Path, args: &[&str]) -> String {
    let out = enclave_output(cwd, args);
    assert!(
        out.status.success(),
        "enclave {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `enclave` command with `args` in `cwd`, free of the caller's `ENCLAVE_*` settings.
pub fn enclave_command(cwd: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(enclave_bin());
    c.args(args)
        .current_dir(cwd)
        .env_remove("ENCLAVE_DATA_DIR")
        .env_remove("ENCLAVE_MASTER_KEY_FILE");
    c
}

/// Runs `enclave` with `args` in `cwd` and returns its output, whatever its exit status.
pub fn enclave_output(cwd: &Path, args: &[&str]) -> Output {
    enclave_command(cwd, args)
        .output()
        .expect("run the enclave binary")
}

/// Third-party sample data carried in the repository (`tests/data`, with its licences and provenance), so a
/// fresh clone's tests need nothing beside it.
pub fn shared_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

/// A scratch directory with a data directory inside, driven through the binary.
pub struct Scratch {
    /// The temporary directory (deleted on drop).
    pub tmp: tempfile::TempDir,
}

impl Scratch {
    /// A new scratch directory.
    pub fn new() -> Scratch {
        Scratch {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Runs `enclave --data-dir <data> args…`, panicking on failure.
    pub fn enclave(&self, data: &str, args: &[&str]) -> String {
        let mut all = vec!["--data-dir", data];
        all.extend_from_slice(args);
        enclave(self.path(), &all)
    }

    /// Runs `enclave --data-dir <data> args…`, which must fail; returns its stderr.
    pub fn enclave_fails(&self, data: &str, args: &[&str]) -> String {
        let mut all = vec!["--data-dir", data];
        all.extend_from_slice(args);
        let out = enclave_output(self.path(), &all);
        assert!(!out.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Writes a demo CSV export of `patients` patients to `export/csv` and initialises data directory
    /// `data`.
    pub fn demo_csv(&self, patients: &str) {
        self.enclave(
            "data",
            &[
                "demo-data",
                "--patients",
                patients,
                "--out",
                "export",
                "--format",
                "csv",
            ],
        );
        self.enclave("data", &["init"]);
    }

    /// Ingests `input` and returns the JSON report.
    pub fn ingest(
        &self,
        data: &str,
        provider: &str,
        dataset: &str,
        input: &Path,
        profile: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        let out = self.ingest_output(data, provider, dataset, input, profile, extra);
        assert!(
            out.status.success(),
            "ingest of {dataset} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("report JSON")
    }

    /// Runs `enclave ingest … --json` and returns its output, whatever its exit status.
    pub fn ingest_output(
        &self,
        data: &str,
        provider: &str,
        dataset: &str,
        input: &Path,
        profile: &str,
        extra: &[&str],
    ) -> Output {
        let input = input.to_str().expect("utf-8 path");
        let mut args = vec![
            "--data-dir",
            data,
            "ingest",
            "--provider",
            provider,
            "--dataset",
            dataset,
            "--input",
            input,
            "--profile",
            profile,
            "--json",
        ];
        args.extend_from_slice(extra);
        enclave_output(self.path(), &args)
    }
}

impl Scratch {
    /// The last `n` audit records of data directory `data`, as JSON objects.
    pub fn audit_records(&self, data: &str, n: usize) -> Vec<serde_json::Value> {
        self.enclave(data, &["audit", "tail", "-n", &n.to_string(), "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
            .collect()
    }

    /// Adds researchers and their grants (`(user, budget set options)`, none: no grant); returns the
    /// client scripts' environment: `ENCLAVE_<USER>_TOKEN` and `ENCLAVE_<USER>_TOTP` (base32 secret).
    pub fn add_researchers(
        &self,
        data: &str,
        dataset: &str,
        users: &[(&str, Option<&[&str]>)],
    ) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for (user, grant) in users {
            let (token, secret) = self.add_user(data, user, "researcher");
            env.push((format!("ENCLAVE_{}_TOKEN", user.to_uppercase()), token));
            env.push((format!("ENCLAVE_{}_TOTP", user.to_uppercase()), secret));
            if let Some(options) = grant {
                let mut args = vec!["budget", "set", user, dataset];
                args.extend_from_slice(options);
                self.enclave(data, &args);
            }
        }
        env
    }

    /// Adds a gateway user; returns its API token and TOTP secret (base32).
    pub fn add_user(&self, data: &str, name: &str, role: &str) -> (String, String) {
        let added: serde_json::Value = serde_json::from_str(&self.enclave(
            data,
            &[
                "users", "add", name, "--role", role, "--by", "admin", "--json",
            ],
        ))
        .expect("users add JSON");
        (
            added["token"].as_str().expect("token").to_owned(),
            added["totp_secret"].as_str().expect("secret").to_owned(),
        )
    }
}

/// The TOTP code of `secret_base32` now.
pub fn code_now(secret_base32: &str) -> String {
    code_at(secret_base32, std::time::SystemTime::now())
}

/// The TOTP code of `secret_base32` at `t`.
pub fn code_at(secret_base32: &str, t: std::time::SystemTime) -> String {
    let secret = data_encoding::BASE32_NOPAD
        .decode(secret_base32.as_bytes())
        .expect("base32 secret");
    let step = notebooks_gateway::auth::totp_step(t);
    format!("{:06}", notebooks_gateway::auth::totp_code(&secret, step))
}

/// A running `enclave serve`, stopped (SIGKILL) on drop.
pub struct Server {
    child: std::process::Child,
    /// The HTTP listener's address.
    pub http: std::net::SocketAddr,
    /// The Flight SQL listener's address.
    pub flight: std::net::SocketAddr,
    /// The Postgres wire listener's address.
    pub pg: std::net::SocketAddr,
}

impl Server {
    /// Starts `enclave --data-dir <data> serve` with every listener on a free loopback port (and
    /// `extra` options) in `cwd`, and waits for its listener lines.
    pub fn start(cwd: &Path, data: &str, extra: &[&str]) -> Server {
        use std::io::BufRead as _;
        let mut args = vec![
            "--data-dir",
            data,
            "serve",
            "--http",
            "127.0.0.1:0",
            "--flight",
            "127.0.0.1:0",
            "--pg",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let mut child = enclave_command(cwd, &args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start enclave serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let (mut http, mut flight, mut pg) = (None, None, None);
        while http.is_none() || flight.is_none() || pg.is_none() {
            let line = lines
                .next()
                .expect("enclave serve printed its listeners before exiting")
                .expect("stdout line");
            let addr = |prefix: &str| {
                line.strip_prefix(prefix).map(|a| {
                    a.trim()
                        .trim_end_matches(" (tls)")
                        .parse::<std::net::SocketAddr>()
                        .expect("address")
                })
            };
            http = http.or(addr("listening: http on "));
            flight = flight.or(addr("listening: flight on "));
            pg = pg.or(addr("listening: pg on "));
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            http: http.expect("http"),
            flight: flight.expect("flight"),
            pg: pg.expect("pg"),
        }
    }

    /// Sends a signal to the server (`HUP`, `TERM`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{name}");
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python of the real-client venv (`$ENCLAVE_VENV`, default `~/.cache/enclave-venv`), created
/// from `tests/clients/requirements.txt` when missing or stale (pip, from the package registry). Built
/// in a scratch directory and renamed into place, so racing test binaries do not see a half-made one.
pub fn client_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(make_client_venv).clone()
}

fn make_client_venv() -> PathBuf {
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements");
    let venv = std::env::var_os("ENCLAVE_VENV").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/enclave-venv"),
        PathBuf::from,
    );
    let stamp = venv.join("enclave-requirements.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return venv.join("bin/python");
    }
    let parent = venv.parent().expect("venv parent");
    std::fs::create_dir_all(parent).expect("venv parent");
    let scratch = parent.join(format!("enclave-venv.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&scratch)
        .status()
        .expect("python3 -m venv")
        .success();
    assert!(ok, "python3 -m venv failed");
    let ok = Command::new(scratch.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .status()
        .expect("pip install")
        .success();
    assert!(ok, "pip install -r {} failed", requirements.display());
    std::fs::write(scratch.join("enclave-requirements.txt"), &wanted).expect("stamp");
    // Replace a stale venv; if another test binary finished first, keep theirs.
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        let _ = std::fs::remove_dir_all(&scratch);
    } else {
        let _ = std::fs::remove_dir_all(&venv);
        if std::fs::rename(&scratch, &venv).is_err() {
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    venv.join("bin/python")
}

/// Sends raw bytes to `addr` and reads until the server closes (or 30 s pass); returns what came back.
pub fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    stream.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    out
}

/// One HTTP/1.1 request (`Connection: close`); returns the status and the body parsed as JSON
/// (`Null` when it is not JSON).
pub fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: enclave\r\nConnection: close\r\n");
    if let Some(b) = bearer {
        req.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let (status, body) = parse_response(&raw_exchange(addr, req.as_bytes()));
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// The status and (de-chunked) body of an HTTP/1.1 response; status 0 when there is none.
pub fn parse_response(raw: &[u8]) -> (u16, Vec<u8>) {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, Vec::new());
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).unwrap_or(0);
            if size == 0 || rest.len() < nl + 2 + size {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[(nl + 4 + size).min(rest.len())..];
        }
        body = out;
    }
    (status, body)
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

/// An opened data directory: its keystore, catalog, and a DataFusion session over a dataset's tables.
#[cfg(feature = "danger-test-hooks")]
pub struct Opened {
    /// The keystore.
    pub keystore: std::sync::Arc<enclave::keys::Keystore>,
    /// The catalog.
    pub catalog: catalog::SqliteCatalog,
    root: PathBuf,
    runtime: tokio::runtime::Runtime,
}

#[cfg(feature = "danger-test-hooks")]
impl Opened {
    /// Opens the data directory at `root`.
    pub fn new(root: &Path) -> Opened {
        let dir = enclave::DataDir::new(root);
        Opened {
            keystore: std::sync::Arc::new(dir.keystore().expect("keystore")),
            catalog: dir.catalog().expect("catalog"),
            root: root.to_owned(),
            runtime: tokio::runtime::Runtime::new().expect("runtime"),
        }
    }

    /// The pseudonymizer this enclave's linkage key gives.
    pub fn pseudonymizer(&self) -> deidentify::Pseudonymizer {
        let k = self.keystore.linkage_key().expect("linkage key");
        deidentify::Pseudonymizer::new(&deidentify::LinkageKey::from_bytes(*k))
    }

    /// The latest version's directory of a dataset.
    pub fn version_dir(&self, dataset: &str) -> PathBuf {
        use catalog::CatalogStore;
        let v = self
            .catalog
            .version(dataset, None)
            .expect("dataset in catalog");
        self.root.join(v.version.storage_path)
    }

    /// Runs SQL over a dataset's decrypted tables (and its quarantine, as `quarantine`); every value as text.
    pub fn sql(&self, dataset: &str, query: &str) -> Vec<Vec<Option<String>>> {
        let dir = self.version_dir(dataset);
        self.runtime.block_on(async {
            let ctx = enclave::storage::danger_session(self.keystore.clone()).expect("session");
            for entry in std::fs::read_dir(&dir).expect("version dir") {
                let path = entry.expect("entry").path();
                if path.extension().is_some_and(|e| e == "parquet") {
                    let name = path
                        .file_stem()
                        .expect("stem")
                        .to_string_lossy()
                        .into_owned();
                    enclave::storage::danger_register_table(&ctx, &name, &path)
                        .await
                        .expect("register");
                }
            }
            let batches = ctx
                .sql(query)
                .await
                .expect("plan")
                .collect()
                .await
                .expect("run");
            to_rows(&batches)
        })
    }
}

/// The rows of a generated export's CSV table, as column → value.
pub fn source_csv(export: &Path, table: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut r =
        csv::Reader::from_path(export.join("csv").join(format!("{table}.csv"))).expect("csv");
    let headers = r.headers().expect("headers").clone();
    r.records()
        .map(|rec| {
            headers
                .iter()
                .zip(rec.expect("record").iter())
                .map(|(h, v)| (h.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

/// The person_id each source patient of a generated export must get: the keyed hash of its validated
/// national ID.
#[cfg(feature = "danger-test-hooks")]
pub fn expected_person_ids(
    opened: &Opened,
    export: &Path,
) -> std::collections::HashMap<String, String> {
    let p = opened.pseudonymizer();
    source_csv(export, "patients")
        .into_iter()
        .map(|r| {
            let (norm, _) =
                deidentify::ids::validate_national_id(&r["SSN"]).expect("valid demo national ID");
            (r["Id"].clone(), p.person_from_national_id(&norm))
        })
        .collect()
}

/// Record batches as rows of optional strings.
pub fn to_rows(batches: &[arrow::record_batch::RecordBatch]) -> Vec<Vec<Option<String>>> {
    let mut rows = Vec::new();
    for b in batches {
        let cols: Vec<arrow::array::StringArray> = b
            .columns()
            .iter()
            .map(|c| {
                let s = arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8)
                    .expect("cast to text");
                s.as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .expect("strings")
                    .clone()
            })
            .collect();
        for i in 0..b.num_rows() {
            rows.push(
                cols.iter()
                    .map(|c| (!arrow::array::Array::is_null(c, i)).then(|| c.value(i).to_owned()))
                    .collect(),
            );
        }
    }
    rows
}

/// Every file under `root`, recursively.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

/// Scans every byte of every file under `root` for each needle; returns `(file, needle)` hits.
pub fn scan_bytes(root: &Path, needles: &[String]) -> Vec<(PathBuf, String)> {
    let ac = aho_corasick::AhoCorasick::new(needles).expect("needles");
    let mut hits = Vec::new();
    for f in files_under(root) {
        let bytes = std::fs::read(&f).expect("read file");
        for m in ac.find_overlapping_iter(&bytes) {
            hits.push((f.clone(), needles[m.pattern().as_usize()].clone()));
        }
    }
    hits
}

/// The demo manifest written by `enclave demo-data`.
pub fn manifest(export: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(export.join("manifest.json")).expect("manifest"))
        .expect("manifest JSON")
}

/// What a gateway protocol's audit records must show: the records of `origin` (each names the peer it
/// came from); its queries on `dataset` all carry a session id, and one of `released_by`'s was released
/// under the researchers' query policy; `signer` both signed in and had a sign-in refused; each
/// `(user, rule)` refusal is there. Returns the protocol's records for further checks.
pub fn assert_gateway_records(
    records: &[serde_json::Value],
    origin: &str,
    dataset: &str,
    released_by: &str,
    signer: &str,
    refusals: &[(&str, &str)],
) -> Vec<serde_json::Value> {
    let mine: Vec<serde_json::Value> = records
        .iter()
        .filter(|r| r["origin"] == origin)
        .cloned()
        .collect();
    assert!(!mine.is_empty(), "no {origin} records");
    for r in &mine {
        assert!(
            r["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1")),
            "{r}"
        );
    }
    let queries: Vec<&serde_json::Value> =
        mine.iter().filter(|r| r["dataset"] == dataset).collect();
    assert!(
        queries
            .iter()
            .all(|r| !r["session"].as_str().unwrap_or("").is_empty())
    );
    assert!(queries.iter().any(|r| r["outcome"] == "released"
        && r["principal"] == released_by
        && r["decision"] == "allow [researchers-query-under-an-active-grant]"));
    for outcome in ["signed-in", "sign-in-refused"] {
        assert!(
            mine.iter()
                .any(|r| r["outcome"] == outcome && r["principal"] == signer),
            "{signer}: {outcome}"
        );
    }
    for (who, rule) in refusals {
        assert!(
            mine.iter().any(|r| r["principal"] == *who
                && r["outcome"] == "refused"
                && r["rule"].as_str().is_some_and(|x| x.starts_with(rule))),
            "{who}'s {rule} refusal is recorded"
        );
    }
    mine
}

/// The value of `name` in an environment from [`Scratch::add_researchers`].
pub fn env_value(env: &[(String, String)], name: &str) -> String {
    env.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .expect(name)
}
