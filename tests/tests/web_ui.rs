//! The web UI through the real `enclave serve`, as a browser without JavaScript would use it (raw HTTP
//! with cookies and form posts): two-factor sign-in behind a double-submit nonce, a session cookie that is
//! HttpOnly and SameSite=Strict, the strict Content-Security-Policy on every page; a researcher files a
//! request, the board approves it from the queue, the researcher's start page shows the budget; a form
//! posted without the CSRF token is refused (403, recorded); a researcher cannot reach the board's pages
//! (403, recorded); a dataset named `<script>alert(1)</script>` with HTML in its provenance and column
//! names, and a request whose project is HTML, render escaped; a researcher's card shows no exact count;
//! the audit page's verify button reports the chain intact; signing out ends the session.

use std::net::SocketAddr;

use enclave_e2e::{Scratch, Server, code_now, parse_response, raw_exchange};

/// One request: status, `Set-Cookie` values, body.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookies: &str,
    form: Option<&[(&str, &str)]>,
) -> (u16, Vec<String>, String, String) {
    let body = form.map_or(String::new(), |pairs| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            s.append_pair(k, v);
        }
        s.finish()
    });
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: enclave\r\nConnection: close\r\n");
    if !cookies.is_empty() {
        req.push_str(&format!("Cookie: {cookies}\r\n"));
    }
    if form.is_some() {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let raw = raw_exchange(addr, req.as_bytes());
    let head =
        String::from_utf8_lossy(&raw[..raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0)])
            .into_owned();
    let set_cookies = head
        .lines()
        .filter_map(|l| l.strip_prefix("set-cookie: "))
        .map(str::to_owned)
        .collect();
    let (status, body) = parse_response(&raw);
    (
        status,
        set_cookies,
        head,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn get(addr: SocketAddr, path: &str, cookies: &str) -> (u16, String) {
    let (status, _, _, body) = exchange(addr, "GET", path, cookies, None);
    (status, body)
}

fn post(addr: SocketAddr, path: &str, cookies: &str, form: &[(&str, &str)]) -> (u16, String) {
    let (status, _, _, body) = exchange(addr, "POST", path, cookies, Some(form));
    (status, body)
}

/// The value of `name="<field>" value="…"` in a page.
fn field(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("{name} in {page}"))
        + marker.len();
    page[start..].split('"').next().expect("value").to_owned()
}

/// Signs in through the form; returns the session cookie and the page's CSRF token.
fn sign_in(addr: SocketAddr, user: &str, token: &str, totp: &str) -> (String, String) {
    let (status, cookies, head, page) = exchange(addr, "GET", "/ui/sign-in", "", None);
    assert_eq!(status, 200);
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    let nonce_cookie = cookies
        .iter()
        .find(|c| c.starts_with("enclave_signin="))
        .expect("nonce cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let nonce = field(&page, "nonce");
    // Without the nonce cookie (a form posted from another site): refused.
    let (status, _) = post(
        addr,
        "/ui/sign-in",
        "",
        &[
            ("nonce", &nonce),
            ("user", user),
            ("token", token),
            ("totp", &code_now(totp)),
        ],
    );
    assert_eq!(status, 403);
    // A wrong code: the form again, with the refusal's rule and its audit receipt.
    let right = code_now(totp);
    let wrong = format!(
        "{:06}",
        (right.parse::<u32>().expect("code") + 1) % 1_000_000
    );
    let post = |code: &str| {
        exchange(
            addr,
            "POST",
            "/ui/sign-in",
            &nonce_cookie,
            Some(&[
                ("nonce", &nonce),
                ("user", user),
                ("token", token),
                ("totp", code),
            ]),
        )
    };
    let (status, _, _, page) = post(&wrong);
    assert_eq!(status, 401, "{page}");
    assert!(
        page.contains("Sign-in refused (rule <code>credentials</code>)")
            && page.contains("Audit receipt: record ")
            && page.contains("&quot;signature&quot;:&quot;"),
        "{page}"
    );
    let (status, cookies, _, _) = post(&right);
    assert_eq!(status, 303, "{cookies:?}");
    let session = cookies
        .iter()
        .find(|c| c.starts_with("enclave_session="))
        .expect("session cookie");
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Strict"),
        "{session}"
    );
    let session = session.split(';').next().expect("pair").to_owned();
    let (status, home) = get(addr, "/ui/", &session);
    assert_eq!(status, 200, "{home}");
    (session.clone(), field(&home, "csrf"))
}

#[test]
fn the_web_ui_signs_in_files_approves_escapes_and_refuses_what_it_must() {
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "60"]);
    // A dataset whose name, provenance and column are HTML, published to the catalog directly (ingest
    // itself refuses such a name): the UI must escape whatever the catalog holds.
    let hostile = "<script>alert(1)</script>";
    let catalog = catalog::SqliteCatalog::open(&s.path().join("data/enclave.db")).expect("catalog");
    let version: catalog::NewVersion = serde_json::from_value(serde_json::json!({
        "dataset": hostile, "version": "1", "storage_path": "datasets/x/1", "key_id": "dk",
        "provenance": {"provider": "<img src=x onerror=alert(2)>", "source_system": "test",
            "extracted_at": "2026-11-25T00:00:00Z", "legal_basis": "<b>bold</b>",
            "consent_scope": "\"><svg onload=alert(3)>", "profile": "hipaa-safe-harbor"},
        "coverage": {"persons": 4321, "time_start": "2001", "time_end": "2020"},
        "max_contributions": 10, "accounting": "basic",
        "tables": [{"name": "patients", "file": "patients.parquet", "rows": 98765,
            "columns": [{"name": "<i>col</i>", "data_type": "Utf8", "role": "value", "action": "keep",
                "lower": null, "upper": null, "domain": ["<a href=javascript:alert(4)>x</a>"]}]}],
        "report": {"note": "<script>alert(5)</script>"}
    }))
    .expect("version");
    catalog::CatalogStore::publish(&catalog, &version).expect("publish");
    let (alice_token, alice_totp) = s.add_user("data", "alice", "researcher");
    let (bob_token, bob_totp) = s.add_user("data", "bob", "board");
    let server = Server::start(s.path(), "data", &[]);
    let addr = server.http;

    // Not signed in: every page sends to the sign-in form.
    let (status, _, head, _) = exchange(addr, "GET", "/ui/requests", "", None);
    assert_eq!(status, 303);
    assert!(head.contains("location: /ui/sign-in"), "{head}");

    let (alice, alice_csrf) = sign_in(addr, "alice", &alice_token, &alice_totp);
    let (bob, bob_csrf) = sign_in(addr, "bob", &bob_token, &bob_totp);

    // The researcher files a request whose project is HTML.
    let request = [
        ("csrf", alice_csrf.as_str()),
        ("project", "<script>alert(6)</script>"),
        ("purpose", "Mortality by age band"),
        ("datasets", "demo-cohort"),
        ("epsilon", "1"),
        ("days", "30"),
    ];
    let (status, page) = post(addr, "/ui/requests", &alice, &request);
    assert_eq!(status, 303, "{page}");
    // Without the CSRF token, or with another session's: refused, recorded.
    let (status, page) = post(addr, "/ui/requests", &alice, &request[1..]);
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("<code>csrf</code>"), "{page}");
    let mut forged = request;
    forged[0].1 = &bob_csrf;
    let (status, _) = post(addr, "/ui/requests", &alice, &forged);
    assert_eq!(status, 403);
    // The researcher cannot reach the board's pages.
    for path in ["/ui/audit", "/ui/audit?user=bob"] {
        let (status, page) = get(addr, path, &alice);
        assert_eq!(status, 403, "{path}: {page}");
    }
    let (status, _) = post(addr, "/ui/audit/verify", &alice, &[("csrf", &alice_csrf)]);
    assert_eq!(status, 403);
    let (status, _) = post(
        addr,
        "/ui/requests/1/approve",
        &alice,
        &[("csrf", &alice_csrf), ("epsilon", "1"), ("days", "30")],
    );
    assert_eq!(status, 403, "a researcher's approval is refused by Cedar");

    // The board's queue shows the request escaped, with its forms; approval with smaller terms.
    let (status, queue) = get(addr, "/ui/requests", &bob);
    assert_eq!(status, 200);
    assert!(
        queue.contains("&lt;script&gt;alert(6)&lt;/script&gt;"),
        "{queue}"
    );
    assert!(!queue.contains("<script>"), "{queue}");
    assert!(queue.contains("/ui/requests/1/approve"), "{queue}");
    let (status, page) = post(
        addr,
        "/ui/requests/1/approve",
        &bob,
        &[("csrf", &bob_csrf), ("epsilon", "0.5"), ("days", "10")],
    );
    assert_eq!(status, 303, "{page}");
    let (_, home) = get(addr, "/ui/", &alice);
    assert!(
        home.contains("<td>demo-cohort</td><td class=\"num\">0.5</td>"),
        "the budget row: {home}"
    );
    assert!(
        home.contains("adbc_driver_flightsql"),
        "connection snippets: {home}"
    );

    // Every page of the hostile dataset escapes it.
    for (who, cookie) in [("alice", &alice), ("bob", &bob)] {
        for path in [
            "/ui/datasets".to_owned(),
            "/ui/datasets?q=%3Cscript".to_owned(),
            format!(
                "/ui/datasets/{}",
                form_urlencoded::byte_serialize(hostile.as_bytes()).collect::<String>()
            ),
        ] {
            let (status, page) = get(addr, &path, cookie);
            assert_eq!(status, 200, "{who} {path}: {page}");
            assert!(
                page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "{who} {path}: {page}"
            );
            for raw in [
                "<script",
                "<img",
                "<svg",
                "<b>",
                "<i>",
                "<a href=javascript",
            ] {
                assert!(!page.contains(raw), "{who} {path} holds {raw}: {page}");
            }
        }
    }
    // A researcher's card shows no exact count; the board's shows the ingest report.
    let card = |cookie: &str| get(addr, "/ui/datasets/demo-cohort", cookie).1;
    let truth = catalog::CatalogStore::version(&catalog, "demo-cohort", None).expect("version");
    let researcher_card = card(&alice);
    let board_card = card(&bob);
    for exact in [
        format!("<dd>{}</dd>", truth.version.coverage.persons),
        format!("Rows written: {}", truth.version.tables[0].rows),
    ] {
        assert!(
            !researcher_card.contains(&exact),
            "{exact} shown to a researcher"
        );
        assert!(board_card.contains(&exact), "{exact} shown to the board");
    }
    assert!(!researcher_card.contains("Ingest report"));
    // Nor does the hostile dataset's card show its figures to a researcher (4,321 persons, 98,765 rows).
    let hostile_path = format!(
        "/ui/datasets/{}",
        form_urlencoded::byte_serialize(hostile.as_bytes()).collect::<String>()
    );
    let (_, page) = get(addr, &hostile_path, &alice);
    assert!(!page.contains("4321") && !page.contains("98765"), "{page}");
    let (_, page) = get(addr, &hostile_path, &bob);
    assert!(page.contains("4321") && page.contains("98765"), "{page}");
    // Every state-changing form of the board refuses a post without the token.
    for path in [
        "/ui/requests/1/reject",
        "/ui/grants/1/revoke",
        "/ui/audit/verify",
        "/ui/sign-out",
    ] {
        let (status, page) = post(addr, path, &bob, &[("reason", "x")]);
        assert_eq!(status, 403, "{path}: {page}");
    }
    // Every page carries the policy.
    for path in [
        "/ui/",
        "/ui/datasets",
        "/ui/requests",
        "/ui/grants",
        "/ui/audit",
    ] {
        let (_, _, head, _) = exchange(addr, "GET", path, &bob, None);
        assert!(
            head.contains("content-security-policy: default-src 'none'")
                && head.contains("x-frame-options: DENY"),
            "{path}: {head}"
        );
    }

    // The verify button.
    let (status, page) = post(addr, "/ui/audit/verify", &bob, &[("csrf", &bob_csrf)]);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("the chain is intact"), "{page}");
    let (status, page) = get(addr, "/ui/audit?user=alice&outcome=refused", &bob);
    assert_eq!(status, 200);
    for refusal in [
        "web form: request access",
        "read the audit log",
        "approve access request 1",
    ] {
        assert!(page.contains(refusal), "{refusal} recorded: {page}");
    }
    // The signed head, for the board to keep outside: the same witness `audit verify --witness` takes.
    let (status, _, head, witness) = exchange(addr, "GET", "/ui/audit/head", &bob, None);
    assert_eq!(status, 200, "{witness}");
    assert!(head.contains("attachment"), "{head}");
    let parsed: serde_json::Value = serde_json::from_str(&witness).expect("json");
    assert!(parsed["seq"].as_i64().is_some_and(|n| n > 0) && parsed["signature"].is_string());
    std::fs::write(s.path().join("witness.json"), &witness).expect("write");
    let (status, _) = get(addr, "/ui/audit/head", &alice);
    assert_eq!(status, 403);
    let (status, page) = get(addr, "/ui/audit?since=yesterday", &bob);
    assert_eq!(status, 400, "{page}");
    // Signing out ends the session itself, not just the cookie.
    let (status, _) = post(addr, "/ui/sign-out", &alice, &[("csrf", &alice_csrf)]);
    assert_eq!(status, 303);
    let (status, _) = get(addr, "/ui/", &alice);
    assert_eq!(status, 303, "the old cookie no longer signs in");
    drop(server);
    let witness = s.path().join("witness.json");
    let verified = s.enclave(
        "data",
        &[
            "audit",
            "verify",
            "--witness",
            witness.to_str().expect("utf-8"),
        ],
    );
    assert!(verified.contains("audit log verifies"), "{verified}");
}

/// A JSON post with extra headers: status and body.
fn post_json(
    addr: SocketAddr,
    path: &str,
    cookies: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: enclave\r\nConnection: close\r\nContent-Type: application/json\r\n"
    );
    if !cookies.is_empty() {
        req.push_str(&format!("Cookie: {cookies}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let (status, body) = parse_response(&raw_exchange(addr, req.as_bytes()));
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn rule_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    v["error"]["rule"].as_str().unwrap_or("").to_owned()
}

/// The passkey calls the script makes are guarded like forms: registering needs the session and its
/// CSRF token, a sign-in the sign-in page's nonce; a name without a passkey gets the one refusal; the
/// script is served from this origin under a policy that allows no other.
#[test]
fn passkey_ceremonies_need_the_session_csrf_token_or_the_sign_in_nonce() {
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "20"]);
    let (token, totp) = s.add_user("data", "carol", "board");
    let server = Server::start(s.path(), "data", &[]);
    let addr = server.http;

    let (status, cookies, head, page) = exchange(addr, "GET", "/ui/sign-in", "", None);
    assert_eq!(status, 200);
    assert!(
        head.contains("script-src 'self'; connect-src 'self'"),
        "{head}"
    );
    assert!(
        page.contains(r#"<script src="/ui/static/passkey.js" defer>"#),
        "{page}"
    );
    assert!(!page.contains("<script>"), "no inline script: {page}");
    let (status, _, head, script) = exchange(addr, "GET", "/ui/static/passkey.js", "", None);
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(script.contains("navigator.credentials.get"), "{script}");
    let (status, _, head, _) = exchange(addr, "GET", "/favicon.ico", "", None);
    assert_eq!(status, 404, "{head}");

    // Sign-in: without the nonce (another site), with a wrong one, then with the page's own.
    let nonce_cookie = cookies
        .iter()
        .find(|c| c.starts_with("enclave_signin="))
        .expect("nonce cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let nonce = nonce_cookie
        .trim_start_matches("enclave_signin=")
        .to_owned();
    let start = r#"{"user":"carol"}"#;
    let (status, body) = post_json(addr, "/ui/passkey/sign-in/start", "", &[], start);
    assert_eq!((status, rule_of(&body)), (403, "csrf".into()), "{body}");
    let (status, body) = post_json(
        addr,
        "/ui/passkey/sign-in/start",
        &nonce_cookie,
        &[("X-Sign-In-Nonce", "00")],
        start,
    );
    assert_eq!((status, rule_of(&body)), (403, "csrf".into()), "{body}");
    let with_nonce = [("X-Sign-In-Nonce", nonce.as_str())];
    // Every name gets options of one shape (a name without a passkey gets stand-ins): the answer does
    // not tell which names exist or have passkeys.
    let mut shapes = Vec::new();
    for user in ["carol", "nobody", "<script>"] {
        let (status, body) = post_json(
            addr,
            "/ui/passkey/sign-in/start",
            &nonce_cookie,
            &with_nonce,
            &serde_json::json!({ "user": user }).to_string(),
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let pk = &v["options"]["publicKey"];
        let mut keys: Vec<String> = pk.as_object().expect("options").keys().cloned().collect();
        keys.sort();
        shapes.push((keys, pk["allowCredentials"].as_array().map(Vec::len)));
        assert_eq!(pk["userVerification"], "required", "{body}");
        assert_eq!(pk["rpId"], "localhost", "{body}");
    }
    assert!(shapes.iter().all(|s| s == &shapes[0]), "{shapes:?}");
    let (status, body) = post_json(
        addr,
        "/ui/passkey/sign-in/finish",
        &nonce_cookie,
        &with_nonce,
        r#"{"ceremony":"x","credential":{"id":"AA","rawId":"AA","type":"public-key","response":{"authenticatorData":"AA","clientDataJSON":"e30","signature":"AA"}}}"#,
    );
    assert_eq!((status, rule_of(&body)), (422, "passkey".into()), "{body}");
    let (status, body) = post_json(
        addr,
        "/ui/passkey/sign-in/start",
        &nonce_cookie,
        &with_nonce,
        "{",
    );
    assert_eq!((status, rule_of(&body)), (400, "request".into()), "{body}");

    // Registration: no session, a session without the CSRF header, then with it.
    let (session, csrf) = sign_in(addr, "carol", &token, &totp);
    let (status, body) = post_json(addr, "/ui/passkeys/register/start", "", &[], "{}");
    assert_eq!((status, rule_of(&body)), (401, "session".into()), "{body}");
    let (status, body) = post_json(addr, "/ui/passkeys/register/start", &session, &[], "{}");
    assert_eq!((status, rule_of(&body)), (403, "csrf".into()), "{body}");
    let (status, body) = post_json(
        addr,
        "/ui/passkeys/register/start",
        &session,
        &[("X-CSRF-Token", &csrf)],
        "{}",
    );
    assert_eq!(status, 200, "{body}");
    let started: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(started["options"]["publicKey"]["rp"]["id"], "localhost");
    let ceremony = started["ceremony"].as_str().expect("ceremony");
    let (status, body) = post_json(
        addr,
        "/ui/passkeys/register/finish",
        &session,
        &[("X-CSRF-Token", &csrf)],
        &serde_json::json!({
            "ceremony": ceremony, "label": "forged",
            // The step-up code (the sign-in used this step's; the next one is accepted for drift).
            "totp": enclave_e2e::code_at(&totp, std::time::SystemTime::now() + std::time::Duration::from_secs(30)),
            "credential": {"id": "AA", "rawId": "AA", "type": "public-key",
                "response": {"attestationObject": "oA", "clientDataJSON": "e30"}}
        })
        .to_string(),
    );
    assert_eq!((status, rule_of(&body)), (422, "passkey".into()), "{body}");
    let (status, page) = get(addr, "/ui/account", &session);
    assert_eq!(status, 200);
    assert!(page.contains("No passkey yet"), "{page}");
    // The refused CSRF attempt is on the record.
    let records = s.audit_records("data", 30);
    assert!(
        records
            .iter()
            .any(|r| r["outcome"] == "refused"
                && r["rule"].as_str().is_some_and(|x| x.contains("csrf"))),
        "{records:?}"
    );
}

/// The card's DP figures: a board member releases them from the card page (once per version); a
/// researcher's card then shows the released, noisy figures and still never the exact person count the
/// board's view holds; a researcher cannot release (403, recorded), nor post without the CSRF token.
#[test]
fn the_board_releases_card_figures_from_the_page_and_researchers_see_only_those() {
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "120"]);
    let (b_token, b_totp) = s.add_user("data", "carol", "board");
    let (r_token, r_totp) = s.add_user("data", "alice", "researcher");
    let server = Server::start(s.path(), "data", &[]);
    let addr = server.http;
    let (board, board_csrf) = sign_in(addr, "carol", &b_token, &b_totp);
    let (alice, alice_csrf) = sign_in(addr, "alice", &r_token, &r_totp);

    let (status, page) = get(addr, "/ui/datasets/demo-cohort", &alice);
    assert_eq!(status, 200);
    assert!(page.contains("Not released yet"), "{page}");
    assert!(!page.contains("Release card figures"), "{page}");
    // A researcher's release is refused and recorded; a board post without the token too.
    let (status, _) = post(
        addr,
        "/ui/datasets/demo-cohort/release",
        &alice,
        &[("csrf", &alice_csrf), ("epsilon", "1")],
    );
    assert_eq!(status, 403);
    let (status, _) = post(
        addr,
        "/ui/datasets/demo-cohort/release",
        &board,
        &[("epsilon", "1")],
    );
    assert_eq!(status, 403);
    for bad in ["", "NaN", "-1", "1e400", "11"] {
        let (status, page) = post(
            addr,
            "/ui/datasets/demo-cohort/release",
            &board,
            &[("csrf", &board_csrf), ("epsilon", bad)],
        );
        assert!(status == 400 || status == 422, "{bad}: {status} {page}");
    }
    let (status, _) = post(
        addr,
        "/ui/datasets/demo-cohort/release",
        &board,
        &[("csrf", &board_csrf), ("epsilon", "2")],
    );
    assert_eq!(status, 303);
    let (status, page) = post(
        addr,
        "/ui/datasets/demo-cohort/release",
        &board,
        &[("csrf", &board_csrf), ("epsilon", "2")],
    );
    assert_eq!(status, 422, "once per version: {page}");
    assert!(page.contains("released already"), "{page}");

    // The researcher's card shows the released figures and the noise, not the exact count.
    let card: serde_json::Value =
        serde_json::from_str(&s.enclave("data", &["catalog", "show", "demo-cohort", "--json"]))
            .expect("card");
    let exact = card["coverage"]["persons"].as_u64().expect("persons");
    let (status, page) = get(addr, "/ui/datasets/demo-cohort", &alice);
    assert_eq!(status, 200);
    assert!(
        page.contains("Population and coverage (DP-released)"),
        "{page}"
    );
    assert!(page.contains("noise scale"), "{page}");
    assert!(!page.contains("exact, board only"), "{page}");
    // What de-identification gave on the rows (persons recoded, values withheld) is exact: not shown.
    assert!(!page.contains("withheld"), "{page}");
    assert!(!page.contains("recoded locally for"), "{page}");
    let persons = page
        .split("<dt>Persons</dt><dd>")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .expect("a released person count")
        .parse::<f64>()
        .expect("a number");
    let scale: f64 = page
        .split("noise scale ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|v| v.parse().ok())
        .expect("scale");
    assert!(scale > 0.0);
    assert!(
        (persons - exact as f64).abs() <= 10.0 * scale + 1.0,
        "released {persons}, truth {exact}, scale {scale}"
    );
    let (_, board_page) = get(addr, "/ui/datasets/demo-cohort", &board);
    assert!(board_page.contains("exact, board only"), "{board_page}");
    assert!(board_page.contains("withheld"), "{board_page}");
    let records = s.audit_records("data", 100);
    assert!(
        records.iter().any(|r| r["principal"] == "alice"
            && r["outcome"] == "refused"
            && r.to_string().contains("release card figures")),
        "{records:?}"
    );
}

/// Budget pages: a researcher sees their own budgets and a chart of their spending drawn on the server
/// (SVG, no script); another researcher's page and a dataset's page are the board's (403, recorded);
/// the board's index lists every researcher and dataset; names are escaped in tables and chart.
#[test]
fn budget_pages_chart_spending_for_the_researcher_and_the_board() {
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "40"]);
    let (b_token, b_totp) = s.add_user("data", "carol", "board");
    let (r_token, r_totp) = s.add_user("data", "alice", "researcher");
    s.enclave(
        "data",
        &[
            "budget",
            "set",
            "alice",
            "demo-cohort",
            "--epsilon",
            "1",
            "--by",
            "carol",
        ],
    );
    s.enclave(
        "data",
        &[
            "budget",
            "set",
            "<b>x</b>",
            "demo-cohort",
            "--epsilon",
            "1",
            "--by",
            "carol",
        ],
    );
    for _ in 0..2 {
        s.enclave(
            "data",
            &[
                "sql",
                "--as",
                "alice",
                "--dataset",
                "demo-cohort",
                "--epsilon",
                "0.1",
                "SELECT COUNT(*) AS n FROM patients",
            ],
        );
    }
    let server = Server::start(s.path(), "data", &[]);
    let addr = server.http;
    let (alice, _) = sign_in(addr, "alice", &r_token, &r_totp);
    let (board, _) = sign_in(addr, "carol", &b_token, &b_totp);

    let (status, cookies, head, _) = exchange(addr, "GET", "/ui/budgets", &alice, None);
    assert_eq!(status, 303, "{cookies:?}");
    assert!(
        head.contains("location: /ui/budgets/researchers/alice"),
        "{head}"
    );
    let (status, page) = get(addr, "/ui/budgets/researchers/alice", &alice);
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("<svg") && page.contains("<polyline"),
        "{page}"
    );
    assert!(page.contains("demo-cohort: 0.2000 of 1.0000"), "{page}");
    assert!(!page.contains("<script"), "{page}");
    for path in [
        "/ui/budgets/researchers/carol",
        "/ui/budgets/datasets/demo-cohort",
    ] {
        let (status, _) = get(addr, path, &alice);
        assert_eq!(status, 403, "{path}");
    }
    let (status, page) = get(addr, "/ui/budgets", &board);
    assert_eq!(status, 200);
    assert!(page.contains("/ui/budgets/researchers/alice"), "{page}");
    assert!(
        page.contains("&lt;b&gt;x&lt;/b&gt;") && !page.contains("<b>x</b>"),
        "{page}"
    );
    let (status, page) = get(addr, "/ui/budgets/datasets/demo-cohort", &board);
    assert_eq!(status, 200);
    assert!(page.contains("alice: 0.2000 of 1.0000"), "{page}");
    assert!(
        page.contains("&lt;b&gt;x&lt;/b&gt;: 0.0000") && !page.contains("<b>x</b>"),
        "{page}"
    );
    let (status, page) = get(addr, "/ui/budgets/researchers/alice", &board);
    assert_eq!(status, 200, "{page}");
    let records = s.audit_records("data", 50);
    assert!(
        records.iter().any(|r| r["principal"] == "alice"
            && r["outcome"] == "refused"
            && r.to_string().contains("budgets")),
        "{records:?}"
    );
}

/// The text of `<dt>{label}</dt><dd><code>…</code>` on a page.
fn shown(page: &str, label: &str) -> String {
    let marker = format!("<dt>{label}</dt><dd><code>");
    page.split(&marker)
        .nth(1)
        .and_then(|rest| rest.split("</code>").next())
        .unwrap_or_else(|| panic!("{label} in {page}"))
        .to_owned()
}

/// User management: the board adds an account (its secrets shown once, and they sign in), resets its
/// factors (the old token stops working, the new one works, sessions end), and disables it; names that
/// cannot be accounts are refused and escaped; a researcher cannot reach the page (403, recorded); the
/// forms need the CSRF token; every change is recorded through the web session.
#[test]
fn the_board_adds_resets_and_disables_accounts_from_the_users_page() {
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "20"]);
    let (b_token, b_totp) = s.add_user("data", "carol", "board");
    let (r_token, r_totp) = s.add_user("data", "alice", "researcher");
    let server = Server::start(s.path(), "data", &[]);
    let addr = server.http;
    let (board, csrf) = sign_in(addr, "carol", &b_token, &b_totp);
    let (alice, alice_csrf) = sign_in(addr, "alice", &r_token, &r_totp);

    let (status, _) = get(addr, "/ui/users", &alice);
    assert_eq!(status, 403);
    let (status, _) = post(
        addr,
        "/ui/users",
        &alice,
        &[
            ("csrf", &alice_csrf),
            ("user", "mallory"),
            ("role", "board"),
        ],
    );
    assert_eq!(status, 403);
    let (status, _) = post(
        addr,
        "/ui/users",
        &board,
        &[("user", "dave"), ("role", "researcher")],
    );
    assert_eq!(status, 403, "no CSRF token");
    for (name, role) in [
        ("<b>x</b>", "researcher"),
        ("dave", "admin"),
        ("", "researcher"),
    ] {
        let (status, page) = post(
            addr,
            "/ui/users",
            &board,
            &[("csrf", &csrf), ("user", name), ("role", role)],
        );
        assert_eq!(status, 422, "{name:?} {role}: {page}");
        assert!(!page.contains("<b>x</b>"), "{page}");
    }

    let (status, page) = post(
        addr,
        "/ui/users",
        &board,
        &[("csrf", &csrf), ("user", "dave"), ("role", "researcher")],
    );
    assert_eq!(status, 200, "{page}");
    let (token, secret) = (
        shown(&page, "API token"),
        shown(&page, "TOTP secret (base32)"),
    );
    let (dave, _) = sign_in(addr, "dave", &token, &secret);
    let (status, _) = get(addr, "/ui/", &dave);
    assert_eq!(status, 200);
    let (status, page) = post(
        addr,
        "/ui/users",
        &board,
        &[("csrf", &csrf), ("user", "dave"), ("role", "researcher")],
    );
    assert_eq!(status, 422, "exists already: {page}");

    // Reset: the session ends, the old token no longer signs in, the new factors do.
    let (status, page) = post(addr, "/ui/users/dave/reset", &board, &[("csrf", &csrf)]);
    assert_eq!(status, 200, "{page}");
    let (new_token, new_secret) = (
        shown(&page, "API token"),
        shown(&page, "TOTP secret (base32)"),
    );
    assert_ne!(new_token, token);
    let (status, _, head, _) = exchange(addr, "GET", "/ui/", &dave, None);
    assert_eq!(status, 303, "the old session ended: {head}");
    let (status, _) = enclave_e2e::http(
        addr,
        "POST",
        "/api/v1/session",
        None,
        Some(
            &serde_json::json!({"user": "dave", "token": token, "totp": enclave_e2e::code_at(&new_secret, std::time::SystemTime::now() + std::time::Duration::from_secs(30))}),
        ),
    );
    assert_eq!(status, 401, "the old token");
    let (dave, _) = sign_in(addr, "dave", &new_token, &new_secret);

    // Disable: the session ends; the board member cannot disable themself here.
    let (status, _) = post(addr, "/ui/users/dave/disable", &board, &[("csrf", &csrf)]);
    assert_eq!(status, 303);
    let (status, _, _, _) = exchange(addr, "GET", "/ui/", &dave, None);
    assert_eq!(status, 303);
    let (status, _) = post(addr, "/ui/users/carol/disable", &board, &[("csrf", &csrf)]);
    assert_eq!(status, 400);
    let (status, _) = post(addr, "/ui/users/nobody/disable", &board, &[("csrf", &csrf)]);
    assert_eq!(status, 422);
    let (status, page) = get(addr, "/ui/users", &board);
    assert_eq!(status, 200);
    assert!(
        page.contains("<td>dave</td><td>researcher</td><td>disabled</td>"),
        "{page}"
    );

    let records = s.audit_records("data", 60);
    for outcome in ["user-added", "factors-reset", "user-disabled"] {
        assert!(
            records.iter().any(|r| r["outcome"] == outcome
                && r["principal"] == "dave"
                && r["origin"] == "http"
                && r["session"].as_str().is_some_and(|x| !x.is_empty())),
            "{outcome}: {records:?}"
        );
    }
    assert!(
        records.iter().any(|r| r["principal"] == "alice"
            && r["outcome"] == "refused"
            && r.to_string().contains("manage users")),
        "{records:?}"
    );
}
