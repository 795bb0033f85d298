//! `enclave catalog release`: a dataset card's figures released through the DP engine under a catalog
//! budget a board member grants, once per version, each query charged and audited under `@catalog`. The
//! test compares the released person and row counts with the truth the exact ingest report holds, within
//! the declared noise scale.

use enclave_e2e::{Scratch, Server, client_python, code_now, http};

#[test]
fn card_figures_are_released_once_under_the_catalog_budget_and_stay_near_the_truth() {
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "300"]);
    let card: serde_json::Value =
        serde_json::from_str(&s.enclave("data", &["catalog", "show", "demo-cohort", "--json"]))
            .expect("card JSON");
    let truth_persons = card["coverage"]["persons"].as_f64().expect("persons");
    let truth_rows: std::collections::HashMap<String, f64> = card["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().expect("name").to_owned(),
                t["rows"].as_f64().expect("rows"),
            )
        })
        .collect();

    // No export before the card is released: its counts would be exact.
    let e = s.enclave_fails(
        "data",
        &["catalog", "export", "demo-cohort", "--format", "croissant"],
    );
    assert!(e.contains("not released yet"), "{e}");

    // ε must be sensible; an unknown dataset is refused.
    for bad in ["0", "-1", "NaN", "inf", "11"] {
        let epsilon = format!("--epsilon={bad}");
        let e = s.enclave_fails(
            "data",
            &[
                "catalog",
                "release",
                "demo-cohort",
                &epsilon,
                "--by",
                "carol",
            ],
        );
        assert!(e.contains("ε"), "{bad}: {e}");
    }
    let e = s.enclave_fails(
        "data",
        &[
            "catalog",
            "release",
            "nope",
            "--epsilon",
            "1",
            "--by",
            "carol",
        ],
    );
    assert!(e.contains("unknown dataset"), "{e}");

    let out = s.enclave(
        "data",
        &[
            "catalog",
            "release",
            "demo-cohort",
            "--epsilon",
            "8",
            "--by",
            "carol",
            "--json",
        ],
    );
    let release: serde_json::Value = serde_json::from_str(&out).expect("release JSON");
    assert_eq!(release["released_by"], "carol");
    let f = &release["figures"];
    assert_eq!(f["epsilon"], 8.0);
    let queries = f["queries"].as_u64().expect("queries");
    assert!(queries >= 6, "{f}");

    // Within ten noise scales of the truth (Laplace: fails with probability e^-10 per figure), and
    // with a positive declared scale: the figure is noisy, not exact.
    let near = |fig: &serde_json::Value, truth: f64, what: &str| {
        let value = fig["value"].as_f64().expect("value");
        let scale = fig["scale"].as_f64().expect("scale");
        assert!(scale > 0.0, "{what}: {fig}");
        assert!(
            (value - truth).abs() <= 10.0 * scale + 1.0,
            "{what}: released {value}, truth {truth}, scale {scale}"
        );
        assert!(value >= 0.0 && value.fract() == 0.0, "{what}: {value}");
    };
    near(&f["persons"], truth_persons, "persons");
    // Each table's truth is its rows with each person counted up to the query's bound plus the cap the
    // left-out estimate counts (what the figure estimates), from the decrypted data.
    let opened = enclave_e2e::Opened::new(&s.path().join("data"));
    let bound = card["max_contributions"].as_f64().expect("bound");
    let caps: std::collections::HashMap<String, f64> = f["row_caps"]
        .as_array()
        .expect("caps")
        .iter()
        .map(|c| {
            (
                c[0].as_str().expect("table").to_owned(),
                c[1].as_f64().expect("cap"),
            )
        })
        .collect();
    for row in f["rows"].as_array().expect("rows") {
        let table = row[0].as_str().expect("table");
        let truth = match caps.get(table) {
            None => truth_rows[table],
            Some(cap) => {
                let per_person = card["tables"]
                    .as_array()
                    .expect("tables")
                    .iter()
                    .find(|t| t["name"] == table)
                    .and_then(|t| t["max_rows_per_person"].as_f64())
                    .unwrap_or(bound);
                let counted = opened.sql(
                    "demo-cohort",
                    &format!(
                        "SELECT CAST(SUM(LEAST(n, {})) AS BIGINT) FROM (SELECT person_id, COUNT(*) AS n FROM {table} GROUP BY person_id)",
                        (per_person + cap) as i64
                    ),
                );
                counted[0][0]
                    .as_deref()
                    .expect("sum")
                    .parse()
                    .expect("number")
            }
        };
        near(&row[1], truth, table);
        assert!(truth <= truth_rows[table]);
    }
    // Coverage: event years released by key selection, within the exact range the board's card holds.
    let coverage = &f["coverage"];
    let (first, last) = (
        coverage["first_year"]
            .as_i64()
            .expect("first year released"),
        coverage["last_year"].as_i64().expect("last year released"),
    );
    let exact = |k: &str| -> i64 {
        card["coverage"][k].as_str().expect("exact year")[..4]
            .parse()
            .expect("year")
    };
    assert!(
        exact("time_start") <= first && first <= last && last <= exact("time_end"),
        "{coverage} vs {}",
        card["coverage"]
    );
    let histograms = f["histograms"].as_array().expect("histograms");
    let gender = histograms
        .iter()
        .find(|h| h["column"] == "gender")
        .unwrap_or_else(|| panic!("{histograms:?}"));
    assert!(
        gender["bins"].as_array().is_some_and(|b| !b.is_empty()),
        "{gender}"
    );

    // Once per version.
    let e = s.enclave_fails(
        "data",
        &[
            "catalog",
            "release",
            "demo-cohort",
            "--epsilon",
            "1",
            "--by",
            "carol",
        ],
    );
    assert!(e.contains("released already"), "{e}");

    // Charged and audited under the catalog principal: one grant and one record per query, and the
    // chain verifies with the budget matching them.
    let records = s.audit_records("data", 200);
    let catalog: Vec<_> = records
        .iter()
        .filter(|r| r["principal"] == "@catalog")
        .collect();
    assert_eq!(
        catalog.iter().filter(|r| r["outcome"] == "granted").count(),
        1,
        "{catalog:?}"
    );
    let released = catalog
        .iter()
        .filter(|r| r["outcome"] == "released")
        .count();
    assert_eq!(
        u64::try_from(released).expect("count"),
        queries - f["skipped"].as_array().map_or(0, |s| s.len() as u64),
        "{catalog:?}"
    );
    let verified = s.enclave("data", &["audit", "verify"]);
    assert!(verified.contains("verifies"), "{verified}");
    let shown = s.enclave("data", &["catalog", "show", "demo-cohort"]);
    assert!(shown.contains("DP-released figures"), "{shown}");

    // The exports carry the released figures (never the exact ones) and validate: pyld expands them,
    // the profiles' required properties are there with the right types, mlcroissant loads Croissant.
    let e = s.enclave_fails(
        "data",
        &["catalog", "export", "demo-cohort", "--format", "dcat"],
    );
    assert!(e.contains("healthdcat-ap or croissant"), "{e}");
    let mut files = Vec::new();
    for format in ["healthdcat-ap", "croissant"] {
        let doc = s.enclave(
            "data",
            &["catalog", "export", "demo-cohort", "--format", format],
        );
        let path = s.path().join(format!("demo-cohort.{format}.jsonld"));
        std::fs::write(&path, &doc).expect("write export");
        files.push(path);
    }
    // No exact figure of the ingest report reaches an export (k reached, persons suppressed, counts).
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        for exact in [
            "k_reached",
            "suppressed_persons",
            "recoded_persons",
            "withheld",
        ] {
            assert!(!text.contains(exact), "{exact} in {}", file.display());
        }
    }
    let hd: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).expect("read")).expect("json");
    assert_eq!(
        hd["healthdcatap:numberOfUniqueIndividuals"]["@value"],
        f["persons"]["value"].as_f64().expect("persons") as u64
    );
    assert_eq!(
        hd["healthdcatap:numberOfRecords"]["@value"],
        f["records"]["value"].as_f64().expect("records") as u64
    );
    let clients = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
    let out = std::process::Command::new(client_python())
        .arg(clients.join("metadata_validate.py"))
        .args(&files)
        .output()
        .expect("run the validator");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "ok: HealthDCAT-AP expands",
        "ok: Croissant expands",
        "ok: mlcroissant loads",
    ] {
        assert!(stdout.contains(check), "{check} in {stdout}");
    }

    // The same documents over HTTP, for any signed-in user; unknown datasets and callers refused.
    let (token, secret) = s.add_user("data", "alice", "researcher");
    let server = Server::start(s.path(), "data", &[]);
    let (status, session) = http(
        server.http,
        "POST",
        "/api/v1/session",
        None,
        Some(&serde_json::json!({"user": "alice", "token": token, "totp": code_now(&secret)})),
    );
    assert_eq!(status, 201, "{session}");
    let session = session["session"].as_str().expect("session").to_owned();
    let (status, doc) = http(
        server.http,
        "GET",
        "/api/v1/datasets/demo-cohort/healthdcat-ap",
        Some(&session),
        None,
    );
    assert_eq!(status, 200, "{doc}");
    // The same figures; the addresses are the server's own.
    for key in [
        "healthdcatap:numberOfUniqueIndividuals",
        "healthdcatap:numberOfRecords",
        "dct:temporal",
        "dct:title",
    ] {
        assert_eq!(doc[key], hd[key], "{key}");
    }
    assert_eq!(
        doc["healthdcatap:hdab"]["foaf:homepage"]["@id"],
        format!("http://localhost:{}/ui/", server.http.port())
    );
    let (status, doc) = http(
        server.http,
        "GET",
        "/api/v1/datasets/demo-cohort/croissant",
        Some(&session),
        None,
    );
    assert_eq!((status, doc["@type"].as_str()), (200, Some("sc:Dataset")));
    let (status, doc) = http(
        server.http,
        "GET",
        "/api/v1/datasets/nope/croissant",
        Some(&session),
        None,
    );
    assert_eq!(
        (status, doc["error"]["rule"].as_str()),
        (404, Some("catalog")),
        "{doc}"
    );
    let (status, _) = http(
        server.http,
        "GET",
        "/api/v1/datasets/demo-cohort/croissant",
        None,
        None,
    );
    assert_eq!(status, 401);
}
