//! TLS on every listener of the real `enclave serve`, with the pair `enclave init --self-signed` makes:
//! psql with `sslmode=verify-full` gets a DP answer and a plaintext psql is refused before it sends its
//! password; curl verifies the HTTP listener's certificate and signs in; ADBC's Flight SQL driver queries
//! over `grpc+tls`; a non-loopback address is refused without TLS and accepted with it.

use std::process::Command;

use enclave_e2e::{
    Scratch, Server, client_python, code_at, code_now, enclave_command, enclave_output,
};

#[test]
fn every_listener_speaks_tls_with_a_self_signed_pair() {
    let python = client_python();
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "40"]);
    let made = s.enclave("data", &["init", "--self-signed"]);
    assert!(
        made.contains("made a self-signed TLS certificate"),
        "{made}"
    );
    let kept = s.enclave("data", &["init", "--self-signed"]);
    assert!(
        kept.contains("kept the self-signed TLS certificate"),
        "{kept}"
    );
    let cert = s.path().join("data/tls/cert.pem");
    let key = s.path().join("data/tls/key.pem");
    let (token, secret) = s.add_user("data", "tess", "researcher");
    s.enclave(
        "data",
        &["budget", "set", "tess", "demo-cohort", "--epsilon", "1.0"],
    );

    // Without TLS a non-loopback address is refused; with it, accepted.
    let out = enclave_output(
        s.path(),
        &[
            "--data-dir",
            "data",
            "serve",
            "--http",
            "0.0.0.0:0",
            "--flight",
            "off",
            "--pg",
            "off",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs TLS"), "{err}");
    let tls_args = [
        "--tls-cert",
        cert.to_str().expect("utf-8"),
        "--tls-key",
        key.to_str().expect("utf-8"),
    ];
    {
        use std::io::BufRead as _;
        let mut args = vec![
            "--data-dir",
            "data",
            "serve",
            "--http",
            "0.0.0.0:0",
            "--flight",
            "off",
            "--pg",
            "off",
        ];
        args.extend_from_slice(&tls_args);
        let mut wide = enclave_command(s.path(), &args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("serve");
        let first = std::io::BufReader::new(wide.stdout.take().expect("stdout"))
            .lines()
            .next()
            .expect("a line")
            .expect("utf-8");
        let _ = wide.kill();
        let _ = wide.wait();
        assert!(
            first.starts_with("listening: http on 0.0.0.0:") && first.ends_with("(tls)"),
            "{first}"
        );
    }
    let server = Server::start(s.path(), "data", &tls_args);

    // psql: verified TLS answers; a plaintext connection is refused before the password.
    let psql = |sslmode: &str, password: &str| {
        Command::new("psql")
            .arg(format!(
                "host=localhost port={} user=tess dbname=demo-cohort sslmode={sslmode} sslrootcert={}",
                server.pg.port(),
                cert.display()
            ))
            .args(["--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg("SELECT COUNT(*) AS n FROM patients")
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql")
    };
    let plain = psql("disable", "not-a-password");
    let text = String::from_utf8_lossy(&plain.stderr);
    assert!(
        !plain.status.success() && text.contains("requires TLS"),
        "{text}"
    );
    let verified = psql("verify-full", &format!("{token}:{}", code_now(&secret)));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(
        verified.status.success() && text.contains("n_ci_low"),
        "{text}"
    );

    // curl: the certificate verifies, a session is opened over HTTPS.
    let next = code_at(
        &secret,
        std::time::SystemTime::now() + std::time::Duration::from_secs(30),
    );
    let body = format!(r#"{{"user":"tess","token":"{token}","totp":"{next}"}}"#);
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(&cert)
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(&body)
        .arg(format!(
            "https://localhost:{}/api/v1/session",
            server.http.port()
        ))
        .output()
        .expect("curl");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && answer.contains("\"session\""),
        "{answer}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session: serde_json::Value = serde_json::from_str(&answer).expect("json");
    let session = session["session"].as_str().expect("session").to_owned();
    // Over TLS the web UI's cookies carry the `__Host-` prefix and `Secure`, and every response (the
    // API's too) tells browsers to come back over TLS only.
    for path in ["/ui/sign-in", "/api/v1/openapi.json"] {
        let out = Command::new("curl")
            .args(["-sS", "-D", "-", "-o", "/dev/null", "--cacert"])
            .arg(&cert)
            .arg(format!("https://localhost:{}{path}", server.http.port()))
            .output()
            .expect("curl");
        let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(
            head.contains("strict-transport-security: max-age=31536000"),
            "{path}: {head}"
        );
        if path == "/ui/sign-in" {
            let cookie = head
                .lines()
                .find(|l| l.starts_with("set-cookie:"))
                .expect("a cookie");
            assert!(
                cookie.starts_with("set-cookie: __host-enclave_signin=")
                    && cookie.contains("; path=/;")
                    && cookie.contains("; secure")
                    && !cookie.contains("domain="),
                "{cookie}"
            );
        }
    }
    // A browser-like sign-in through the form over TLS: curl's cookie engine keeps the prefixed
    // cookies (it applies the `__Host-` rules) and sends them back; the session opens the home page.
    let (ulla_token, ulla_secret) = s.add_user("data", "ulla", "researcher");
    let jar = s.path().join("cookies.txt");
    let url = |path: &str| format!("https://localhost:{}{path}", server.http.port());
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&cert)
            .arg("-b")
            .arg(&jar)
            .arg("-c")
            .arg(&jar)
            .args(args)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let form = curl(&[&url("/ui/sign-in")]);
    let marker = "name=\"nonce\" value=\"";
    let nonce = form[form.find(marker).expect("nonce") + marker.len()..]
        .split('"')
        .next()
        .expect("value")
        .to_owned();
    let code = code_now(&ulla_secret);
    let posted = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--data-urlencode",
        &format!("nonce={nonce}"),
        "--data-urlencode",
        "user=ulla",
        "--data-urlencode",
        &format!("token={ulla_token}"),
        "--data-urlencode",
        &format!("totp={code}"),
        &url("/ui/sign-in"),
    ]);
    assert!(
        posted.starts_with("HTTP/1.1 303") && posted.contains("__Host-enclave_session="),
        "{posted}"
    );
    let home = curl(&[&url("/ui/")]);
    assert!(home.contains("ulla (researcher)"), "{home}");
    let plain_http = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!(
            "http://127.0.0.1:{}/api/v1/openapi.json",
            server.http.port()
        ))
        .output()
        .expect("curl");
    assert!(
        !String::from_utf8_lossy(&plain_http.stdout).contains("openapi"),
        "no plaintext answer"
    );

    // ADBC over grpc+tls with the certificate as its root, the session as the password.
    let script = "import sys, adbc_driver_flightsql.dbapi as f\n\
        c = f.connect(sys.argv[1], db_kwargs={'username': 'tess', 'password': sys.argv[2],\n\
        \x20   'adbc.flight.sql.client_option.tls_root_certs': open(sys.argv[3]).read()})\n\
        cur = c.cursor()\n\
        cur.execute('SELECT COUNT(*) AS n FROM \"demo-cohort\".patients')\n\
        print(cur.fetch_arrow_table().column_names)\n";
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(format!("grpc+tls://localhost:{}", server.flight.port()))
        .arg(&session)
        .arg(&cert)
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("n_ci_low"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
