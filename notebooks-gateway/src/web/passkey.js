// Passkeys for the enclave's web UI: the only script its pages load (Content-Security-Policy
// `script-src 'self'`), and only passkeys need it — every other flow is a plain form.
//
// Registration (account page) and sign-in (sign-in page) each run one WebAuthn ceremony: the server
// starts it and returns the options, the browser's authenticator answers (with user verification:
// fingerprint, face or PIN), and the server checks the answer. Binary fields cross as base64url.
"use strict";

(function () {
  function fromB64u(text) {
    let s = text.replace(/-/g, "+").replace(/_/g, "/");
    while (s.length % 4) s += "=";
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  function toB64u(buffer) {
    const bytes = new Uint8Array(buffer);
    let bin = "";
    for (let i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  async function post(url, headers, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: Object.assign({ "Content-Type": "application/json" }, headers),
      body: JSON.stringify(body),
    });
    let answer = {};
    try {
      answer = await response.json();
    } catch (_) {
      answer = {};
    }
    if (!response.ok) {
      const e = answer.error || {};
      throw new Error(e.message || "the server refused (HTTP " + response.status + ")");
    }
    return answer;
  }

  function show(status, text, ok) {
    status.textContent = text;
    status.className = ok ? "ok" : "error";
  }

  async function register(section) {
    const status = section.querySelector("[data-status]");
    const label = section.querySelector("input[name=label]").value.trim();
    if (!label) {
      show(status, "Give the passkey a label (e.g. the device it is on).", false);
      return;
    }
    const totp = section.querySelector("input[name=totp]").value.trim();
    if (!/^[0-9]{6}$/.test(totp)) {
      show(status, "Enter the 6-digit code your authenticator app shows now.", false);
      return;
    }
    const headers = { "X-CSRF-Token": section.dataset.csrf };
    const start = await post("/ui/passkeys/register/start", headers, {});
    const pk = start.options.publicKey;
    pk.challenge = fromB64u(pk.challenge);
    pk.user.id = fromB64u(pk.user.id);
    (pk.excludeCredentials || []).forEach(function (c) { c.id = fromB64u(c.id); });
    const made = await navigator.credentials.create({ publicKey: pk });
    const credential = {
      id: made.id,
      rawId: toB64u(made.rawId),
      type: made.type,
      response: {
        attestationObject: toB64u(made.response.attestationObject),
        clientDataJSON: toB64u(made.response.clientDataJSON),
      },
      extensions: made.getClientExtensionResults ? made.getClientExtensionResults() : {},
    };
    await post("/ui/passkeys/register/finish", headers, {
      ceremony: start.ceremony,
      label: label,
      totp: totp,
      credential: credential,
    });
    show(status, "Passkey registered. You can now sign in with it alone.", true);
    window.location.reload();
  }

  async function signIn(section) {
    const status = section.querySelector("[data-status]");
    const user = section.querySelector("input[name=user]").value.trim();
    if (!user) {
      show(status, "Enter your user name.", false);
      return;
    }
    const headers = { "X-Sign-In-Nonce": section.dataset.nonce };
    const start = await post("/ui/passkey/sign-in/start", headers, { user: user });
    const pk = start.options.publicKey;
    pk.challenge = fromB64u(pk.challenge);
    (pk.allowCredentials || []).forEach(function (c) { c.id = fromB64u(c.id); });
    const got = await navigator.credentials.get({ publicKey: pk });
    const r = got.response;
    const credential = {
      id: got.id,
      rawId: toB64u(got.rawId),
      type: got.type,
      response: {
        authenticatorData: toB64u(r.authenticatorData),
        clientDataJSON: toB64u(r.clientDataJSON),
        signature: toB64u(r.signature),
        userHandle: r.userHandle ? toB64u(r.userHandle) : null,
      },
      extensions: got.getClientExtensionResults ? got.getClientExtensionResults() : {},
    };
    const done = await post("/ui/passkey/sign-in/finish", headers, {
      ceremony: start.ceremony,
      credential: credential,
    });
    window.location.assign(done.redirect);
  }

  function wire(id, run) {
    const section = document.getElementById(id);
    if (!section) return;
    const status = section.querySelector("[data-status]");
    if (!window.PublicKeyCredential) {
      show(status, "This browser does not offer passkeys; use the token and code.", false);
      return;
    }
    section.hidden = false;
    section.querySelector("button").addEventListener("click", function () {
      show(status, "Waiting for your authenticator…", true);
      run(section).catch(function (e) { show(status, String(e.message || e), false); });
    });
  }

  wire("passkey-register", register);
  wire("passkey-sign-in", signIn);
})();
