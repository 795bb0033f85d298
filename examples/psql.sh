#!/usr/bin/env bash
# The enclave's Postgres listener with psql: sign in with two factors, list the tables of a dataset and
# their columns (roles and DP bounds in the descriptions), ask differentially private queries (cost,
# budget left and the audit record come as a NOTICE), and choose what a query spends. Needs psql.
#
#   ENCLAVE_PG_HOST=127.0.0.1 ENCLAVE_PG_PORT=5433 ENCLAVE_USER=alice ENCLAVE_TOKEN=… ENCLAVE_TOTP=123456 \
#   ENCLAVE_DATASET=demo-cohort bash examples/psql.sh
#
# ENCLAVE_TOTP is the current code of your authenticator app (each code signs in once); the password
# `<token>:<code>` opens a session, and the session from `enclave login` works as a password too.
set -euo pipefail
: "${ENCLAVE_PG_HOST:=127.0.0.1}" "${ENCLAVE_PG_PORT:=5433}" "${ENCLAVE_DATASET:=demo-cohort}"
: "${ENCLAVE_USER:?set ENCLAVE_USER}" "${ENCLAVE_TOKEN:?set ENCLAVE_TOKEN}" "${ENCLAVE_TOTP:?set ENCLAVE_TOTP}"

# One connection for everything (the code signs in once). The database is the dataset unqualified
# table names refer to; ON_ERROR_STOP makes a refusal end the script with its message.
PGPASSWORD="$ENCLAVE_TOKEN:$ENCLAVE_TOTP" psql --no-psqlrc -v ON_ERROR_STOP=1 \
  -h "$ENCLAVE_PG_HOST" -p "$ENCLAVE_PG_PORT" -U "$ENCLAVE_USER" -d "$ENCLAVE_DATASET" <<'SQL'
-- The tables you may query, and one table's columns with their roles and DP bounds.
\dt
\d+ patients
-- A cohort count by gender with 95 % intervals (the default ε).
SELECT gender, COUNT(*) AS patients FROM patients GROUP BY gender ORDER BY gender;
-- The next queries spend ε 0.2 each.
SET enclave.epsilon = 0.2;
SELECT AVG(total_cost) AS mean_cost FROM encounters;
SQL
