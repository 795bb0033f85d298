"""The board's web UI in a real browser: Debian's Chromium, headless, driven by Playwright (nothing is
downloaded: `executable_path` is the system's Chromium). Driven by tests/tests/browser_tour.rs.

- A board member signs in with token and TOTP, registers a passkey on a virtual WebAuthn authenticator
  (CDP `WebAuthn.addVirtualAuthenticator`, CTAP2, user verification on), signs out, and signs in with the
  passkey alone.
- A researcher signs in with token and TOTP and files an access request in the web form.
- The board approves it with a smaller budget and an earlier expiry; the researcher's query through Flight
  SQL (ADBC) then succeeds; the board revokes the grant and the same query is refused.
- The audit page shows every step, and its verify button reports the chain intact.
- Every page is saved as a screenshot (ENCLAVE_SCREENSHOTS), in the order the README's tour lists them.

Environment: ENCLAVE_URL (http://localhost:PORT), ENCLAVE_FLIGHT (grpc://HOST:PORT), ENCLAVE_DATASET,
ENCLAVE_SCREENSHOTS, ENCLAVE_CHROMIUM (default /usr/bin/chromium) and, for BOARD and ALICE,
ENCLAVE_<U>_TOKEN and ENCLAVE_<U>_TOTP. Prints one `ok: …` line per check; any failure raises.
"""
import os
import re

import adbc_driver_flightsql.dbapi as flight_sql
from playwright.sync_api import expect, sync_playwright

from enclave_credentials import token, totp

URL = os.environ["ENCLAVE_URL"].rstrip("/")
FLIGHT = os.environ["ENCLAVE_FLIGHT"]
DATASET = os.environ["ENCLAVE_DATASET"]
SHOTS = os.environ["ENCLAVE_SCREENSHOTS"]
CHROMIUM = os.environ.get("ENCLAVE_CHROMIUM", "/usr/bin/chromium")
QUERY = f'SELECT COUNT(*) AS patients FROM "{DATASET}".patients'

shots = []


def shot(page, name):
    """Saves the whole page as `NN-name.png`."""
    path = os.path.join(SHOTS, "%02d-%s.png" % (len(shots) + 1, name))
    page.screenshot(path=path, full_page=True)
    shots.append(path)


def sign_in_with_code(page, user):
    page.goto(URL + "/ui/sign-in")
    page.fill("form[action='/ui/sign-in'] input[name=user]", user)
    page.fill("input[name=token]", token(user))
    page.fill("input[name=totp]", totp(user))
    page.click("form[action='/ui/sign-in'] button[type=submit]")
    expect(page.locator("span.who")).to_contain_text(user)


def flight_query(password):
    conn = flight_sql.connect(URI_FLIGHT, db_kwargs={"username": "alice", "password": password})
    try:
        with conn.cursor() as cur:
            cur.execute(QUERY)
            return cur.fetch_arrow_table()
    finally:
        conn.close()


URI_FLIGHT = FLIGHT

with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"],
    )
    errors = []

    # --- The board member: token and code, then a passkey on a virtual authenticator.
    board_ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    board = board_ctx.new_page()
    board.on("pageerror", lambda e: errors.append(str(e)))
    board.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    board.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    board.goto(URL + "/ui/sign-in")
    expect(board.locator("#passkey-sign-in")).to_be_visible()
    shot(board, "sign-in")
    sign_in_with_code(board, "board")
    shot(board, "board-home")
    print("ok: the board member signed in with token and TOTP")

    cdp = board_ctx.new_cdp_session(board)
    cdp.send("WebAuthn.enable")
    authenticator = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
        "hasUserVerification": True, "isUserVerified": True, "automaticPresenceSimulation": True,
    }})["authenticatorId"]
    board.goto(URL + "/ui/account")
    board.fill("#passkey-register input[name=label]", "virtual authenticator")
    # A step-up: the current code again (the sign-in used this step's, so the next step's, which the
    # server accepts for clock drift).
    board.fill("#passkey-register input[name=totp]", totp("board", 1))
    board.click("#passkey-register button")
    expect(board.locator("table")).to_contain_text("virtual authenticator")
    creds = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})["credentials"]
    assert len(creds) == 1, creds
    shot(board, "account-passkeys")
    print("ok: the board member registered a passkey (user verification on)")

    board.click("form.signout button")
    expect(board).to_have_url(re.compile(r"/ui/sign-in$"))
    board.fill("#passkey-sign-in input[name=user]", "board")
    board.click("#passkey-sign-in button")
    expect(board.locator("span.who")).to_contain_text("board (board)")
    expect(board).to_have_url(re.compile(r"/ui/$"))
    print("ok: the board member signed in with the passkey alone")

    # --- The researcher: token and code, then the request form.
    alice_ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    alice = alice_ctx.new_page()
    alice.on("pageerror", lambda e: errors.append(str(e)))
    sign_in_with_code(alice, "alice")
    session = next(c["value"] for c in alice_ctx.cookies() if c["name"] == "enclave_session")
    shot(alice, "researcher-home")
    alice.goto(URL + "/ui/datasets")
    expect(alice.locator("main")).to_contain_text(DATASET)
    shot(alice, "datasets")
    alice.click(f"a[href='/ui/datasets/{DATASET}']")
    shot(alice, "dataset-card-researcher")
    alice.goto(URL + "/ui/requests")
    alice.fill("input[name=project]", "Readmission after heart failure")
    alice.fill("textarea[name=purpose]", "Estimate 30-day readmission rates by age band for a service review.")
    alice.check(f"input[name=datasets][value='{DATASET}']")
    alice.fill("input[name=epsilon]", "2")
    alice.fill("input[name=days]", "90")
    alice.click("form[action='/ui/requests'] button[type=submit]")
    expect(alice.locator("main")).to_contain_text("Readmission after heart failure")
    expect(alice.locator("main")).to_contain_text("pending")
    shot(alice, "researcher-requests")
    print("ok: the researcher signed in with TOTP and filed a request")

    try:
        flight_query(session)
        raise AssertionError("a query before any grant was answered")
    except flight_sql.Error as e:
        assert "refused (rule 'access')" in str(e), str(e)
        print("ok: before the grant the query is refused:", str(e).splitlines()[0][:120])

    # --- The board approves with a smaller budget and an earlier expiry.
    board.goto(URL + "/ui/requests")
    row = board.locator("tr", has_text="Readmission after heart failure")
    row.locator("input[name=epsilon]").fill("0.5")
    row.locator("input[name=days]").fill("7")
    shot(board, "board-request-queue")
    row.locator("form[action$='/approve'] button").click()
    expect(board.locator("main")).to_contain_text("approved")
    shot(board, "board-request-approved")
    board.goto(URL + "/ui/grants")
    expect(board.locator("main")).to_contain_text("alice")
    shot(board, "board-grants")
    print("ok: the board approved ε 0.5 for 7 days (asked: ε 2, 90 days)")

    alice.goto(URL + "/ui/")
    expect(alice.locator("main")).to_contain_text("0.5")
    shot(alice, "researcher-home-granted")
    answer = flight_query(session)
    assert answer.num_rows == 1 and answer.column_names[0] == "patients", answer
    print("ok: the researcher's Flight SQL query is answered:", answer.to_pylist())
    alice.goto(URL + "/ui/budgets")
    expect(alice.locator("figure.chart svg polyline")).to_have_count(1)
    shot(alice, "researcher-budget")
    board.goto(URL + f"/ui/budgets/datasets/{DATASET}")
    expect(board.locator("figure.chart svg polyline")).to_have_count(1)
    shot(board, "board-dataset-budget")
    print("ok: the budget pages chart the spending")

    # --- Revocation: the next query is refused.
    board.goto(URL + "/ui/grants")
    grant_row = board.locator("tr", has_text="alice")
    grant_row.locator("input[name=reason]").fill("project closed early")
    grant_row.locator("form[action$='/revoke'] button").click()
    expect(board.locator("main")).to_contain_text("revoked by board")
    try:
        flight_query(session)
        raise AssertionError("a query after revocation was answered")
    except flight_sql.Error as e:
        text = str(e)
        assert "refused (rule 'access')" in text, text
        print("ok: after revocation the query is refused:", text.splitlines()[0][:120])

    # --- The audit page shows it all, and the chain verifies.
    board.goto(URL + "/ui/audit")
    main = board.locator("main")
    for outcome in ["passkey-added", "signed-in", "access-requested", "access-approved",
                    "grant-revoked", "released", "refused"]:
        expect(main).to_contain_text(outcome)
    shot(board, "audit-log")
    board.click("form[action='/ui/audit/verify'] button")
    expect(board.locator("p.ok")).to_contain_text("intact")
    shot(board, "audit-verified")
    board.goto(URL + f"/ui/datasets/{DATASET}")
    shot(board, "dataset-card-board")
    board.goto(URL + "/ui/users")
    expect(board.locator("main")).to_contain_text("alice")
    shot(board, "board-users")
    print("ok: the audit page lists every step and the verify button reports the chain intact")

    # --- Removing the passkey ends the session it opened (this one): back to the sign-in form.
    board.goto(URL + "/ui/account")
    board.click("form[action^='/ui/account/passkeys/'] button")
    expect(board).to_have_url(re.compile(r"/ui/sign-in$"))
    board.goto(URL + "/ui/audit")
    expect(board).to_have_url(re.compile(r"/ui/sign-in$"))
    print("ok: removing the passkey ended the session it opened")

    assert not errors, f"the pages logged script errors: {errors}"
    browser.close()

for path in shots:
    print("screenshot:", os.path.basename(path))
