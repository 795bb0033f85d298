#!/usr/bin/env bash
# The enclave's HTTP API with curl: sign in with two factors, list the datasets you may query, ask a
# differentially private query, and see the budget left. Needs curl and jq.
#
#   ENCLAVE_URL=http://127.0.0.1:8080 ENCLAVE_USER=alice ENCLAVE_TOKEN=… ENCLAVE_TOTP=123456 \
#   ENCLAVE_DATASET=demo-cohort bash examples/http.sh
#
# ENCLAVE_TOTP is the current code of your authenticator app (each code signs in once).
set -euo pipefail
: "${ENCLAVE_URL:=http://127.0.0.1:8080}" "${ENCLAVE_DATASET:=demo-cohort}"
: "${ENCLAVE_USER:?set ENCLAVE_USER}" "${ENCLAVE_TOKEN:?set ENCLAVE_TOKEN}" "${ENCLAVE_TOTP:?set ENCLAVE_TOTP}"

api() { # METHOD PATH [JSON]: prints the body; fails with the enclave's message on an error status.
  local out status
  out=$(curl -sS -X "$1" "$ENCLAVE_URL$2" ${SESSION:+-H "Authorization: Bearer $SESSION"} \
        ${3:+-H 'Content-Type: application/json' --data-binary "$3"} -w '\n%{http_code}')
  status=${out##*$'\n'}; out=${out%$'\n'*}
  if [[ $status != 2* ]]; then echo "HTTP $status: $(jq -r '.error.message' <<<"$out")" >&2; return 1; fi
  printf '%s\n' "$out"
}

# 1. A session from the token and the TOTP code (built with jq: no string pasting into JSON).
SESSION=$(api POST /api/v1/session "$(jq -n --arg u "$ENCLAVE_USER" --arg t "$ENCLAVE_TOKEN" \
          --arg c "$ENCLAVE_TOTP" '{user: $u, token: $t, totp: $c}')" | jq -r .session)
export SESSION

# 2. The datasets you may query, with their tables (never row counts).
api GET /api/v1/datasets | jq -r '.[] | "\(.name) (version \(.version)): \([.tables[].name] | join(", "))"'

# 3. A cohort count by gender, with 95 % intervals; ε 0.1 is charged to your budget.
api POST /api/v1/query "$(jq -n --arg d "$ENCLAVE_DATASET" '{dataset: $d, epsilon: 0.1,
    sql: "SELECT gender, COUNT(*) AS patients FROM patients GROUP BY gender"}')"

# 4. What is left.
api GET /api/v1/budget | jq '.[] | {dataset, epsilon, spent_epsilon, expires_at}'
