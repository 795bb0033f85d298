"""psycopg 3 against `enclave serve`'s Postgres listener: a DP answer with its NOTICE, both query protocols,
pandas, the catalog queries DBeaver (PgJDBC) and SQLAlchemy send at connect, and every refusal the gateway
issue lists. Driven by tests/tests/gateway_pg.rs.

Environment: ENCLAVE_PG (host:port) and, per user U in ALICE BOB CAROL ERIN, ENCLAVE_<U>_TOKEN and
ENCLAVE_<U>_TOTP (base32 secret). Prints one `ok: …` line per check; any failure raises.
"""
import os

import pandas as pd
import psycopg

from enclave_credentials import token, totp

HOST, PORT = os.environ["ENCLAVE_PG"].rsplit(":", 1)
DATASET = "demo-cohort"
QUERY = ('SELECT p.gender, COUNT(*) AS n FROM "demo-cohort".encounters e '
         'JOIN "demo-cohort".patients p ON e.person_id = p.person_id GROUP BY p.gender')


def connect(user, password, dbname=DATASET, autocommit=True):
    return psycopg.connect(host=HOST, port=PORT, user=user, password=password, dbname=dbname,
                           sslmode="disable", autocommit=autocommit, connect_timeout=10)


def refused(fn, *needles):
    try:
        fn()
    except psycopg.Error as e:
        text = str(e)
        assert all(n in text for n in needles), f"expected {needles} in: {text}"
        return text
    raise AssertionError(f"expected a refusal naming {needles}")


def rows(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


# Sign-in: without the TOTP code, with a wrong one; then the right one, then the same one again.
refused(lambda: connect("alice", token("alice")), "session")
print("ok: no TOTP code is refused")
code = totp("alice")
wrong = "%06d" % ((int(code) + 1) % 1_000_000)
refused(lambda: connect("alice", f"{token('alice')}:{wrong}"), "credentials", 'receipt: {"seq":')
print("ok: a wrong TOTP code is refused, with the signed receipt of its record")
alice = connect("alice", f"{token('alice')}:{code}", autocommit=False)
refused(lambda: connect("alice", f"{token('alice')}:{code}"), "replayed-code")
print("ok: a replayed TOTP code is refused")

# A DP answer: rows with intervals, cost and budget as a NOTICE (psycopg's default, non-autocommit
# connection wraps it in BEGIN … COMMIT; the query has no parameters, so the simple protocol).
notices = []
alice.add_notice_handler(lambda d: notices.append(d.message_primary))
with alice.cursor() as cur:
    cur.execute(QUERY)
    columns = [d.name for d in cur.description]
    answer = cur.fetchall()
alice.commit()
assert columns == ["gender", "n", "n_ci_low", "n_ci_high"], columns
assert len(answer) == 4 and all(r[2] <= r[3] for r in answer), answer
assert any("cost: ε 0.100000" in n and "budget left" in n and "audit record #" in n for n in notices), notices
print(f"ok: a DP answer with intervals, and its cost in a NOTICE ({len(notices)} notices)")

# The extended protocol (a server-side prepared statement), the connection's database as the default
# dataset, and pandas.
with alice.cursor() as cur:
    cur.execute("SELECT AVG(base_cost) AS cost FROM encounters", prepare=True)
    assert [d.name for d in cur.description] == ["cost", "cost_ci_low", "cost_ci_high"]
    assert len(cur.fetchall()) == 1
alice.commit()
with alice.cursor() as cur:
    cur.execute("SELECT COUNT(*) AS patients FROM patients")
    frame = pd.DataFrame(cur.fetchall(), columns=[d.name for d in cur.description])
alice.commit()
assert list(frame.columns) == ["patients", "patients_ci_low", "patients_ci_high"], frame
print("ok: the extended protocol, the database as default dataset, and pandas")

# SET enclave.epsilon chooses what the next query spends.
alice.autocommit = True
notices.clear()
rows(alice, "SET enclave.epsilon = 0.25")
assert rows(alice, "SHOW enclave.epsilon") == [("0.25",)]
rows(alice, "SELECT COUNT(*) FROM patients")
assert any("cost: ε 0.250000" in n for n in notices), notices
rows(alice, 'SET "Enclave".EPSILON = 0.3')
assert rows(alice, "SHOW enclave.epsilon") == [("0.3",)]
rows(alice, "SET enclave.epsilon = 0.25")
refused(lambda: rows(alice, "SET enclave.epsilon = 'NaN'"), "positive number")
refused(lambda: rows(alice, "SET enclave.delta = 5"), "positive number")
refused(lambda: rows(alice, "SET enclave.epsilonn = 1"), "unrecognized")
refused(lambda: rows(alice, "SET enclave.epsilon = -1"), "positive number")
print("ok: SET enclave.epsilon")

# Bind parameters are for catalog queries; a DP query takes none.
refused(lambda: rows(alice, "SELECT COUNT(*) FROM patients WHERE birth_year > %s", (1950,)), "parameters")
print("ok: a DP query with bind parameters is refused")

# What DBeaver (PgJDBC) and SQLAlchemy send at connect: answered, and no row count anywhere.
for sql, params in [
    ("SET extra_float_digits = 3", None),
    ("SET application_name = 'PostgreSQL JDBC Driver'", None),
    ("SELECT current_schema(),session_user", None),
    ("SELECT n.oid,n.*,d.description FROM pg_catalog.pg_namespace n LEFT OUTER JOIN pg_catalog.pg_description d "
     "ON d.objoid=n.oid AND d.objsubid=0 AND d.classoid='pg_namespace'::regclass ORDER BY nspname", None),
    ("SELECT n.nspname = ANY(current_schemas(true)), n.nspname, t.typname FROM pg_catalog.pg_type t "
     "JOIN pg_catalog.pg_namespace n ON t.typnamespace = n.oid WHERE t.oid = 1034", None),
    ("SHOW search_path", None),
    ("SELECT db.oid,db.* FROM pg_catalog.pg_database db WHERE datname=%s", (DATASET,)),
    ("SELECT * FROM pg_catalog.pg_settings where name='standard_conforming_strings'", None),
    ("SELECT version()", None),
    ("SELECT * FROM pg_catalog.pg_enum WHERE 1<>1 LIMIT 1", None),
    ("SELECT reltype FROM pg_catalog.pg_class WHERE 1<>1 LIMIT 1", None),
    ("SELECT c.oid,c.*,d.description,pg_catalog.pg_get_expr(c.relpartbound, c.oid) as partition_expr, "
     "pg_catalog.pg_get_partkeydef(c.oid) as partition_key FROM pg_catalog.pg_class c "
     "LEFT OUTER JOIN pg_catalog.pg_description d ON d.objoid=c.oid AND d.objsubid=0 "
     "AND d.classoid='pg_class'::regclass WHERE c.relnamespace=11 AND c.relkind not in ('i','I','c')", None),
    ("select pg_catalog.version()", None),
    ("select current_schema()", None),
    ("show transaction isolation level", None),
    ("show standard_conforming_strings", None),
    ("SELECT pg_catalog.pg_class.relname FROM pg_catalog.pg_class JOIN pg_catalog.pg_namespace "
     "ON pg_catalog.pg_namespace.oid = pg_catalog.pg_class.relnamespace "
     "WHERE pg_catalog.pg_class.relkind = ANY (ARRAY[%s::VARCHAR, %s::VARCHAR]) "
     "AND pg_catalog.pg_class.relpersistence != %s::VARCHAR AND pg_catalog.pg_table_is_visible(pg_catalog.pg_class.oid) "
     "AND pg_catalog.pg_namespace.nspname != %s::VARCHAR", ("r", "p", "t", "pg_catalog")),
]:
    rows(alice, sql, params)
assert rows(alice, "SELECT version()")[0][0].startswith("PostgreSQL 16")
sizes = rows(alice, "SELECT c.relname, c.reltuples, c.relpages, pg_catalog.pg_total_relation_size(c.oid), "
                    "pg_catalog.pg_relation_size(c.oid) FROM pg_catalog.pg_class c")
assert sizes and all(r[1] == -1 and r[2] == 0 and r[3] is None and r[4] is None for r in sizes), sizes
tables = rows(alice, "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1", (DATASET,))
assert ("encounters",) in tables and ("patients",) in tables, tables
print(f"ok: DBeaver's and SQLAlchemy's catalog queries answered without row counts ({len(tables)} tables)")

# Refusals: row-level, no grant, an ended grant, budget exhaustion.
refused(lambda: rows(alice, 'SELECT * FROM "demo-cohort".patients'), "row-level")
print("ok: a row-level query is refused")
with connect("bob", f"{token('bob')}:{totp('bob')}") as bob:
    refused(lambda: rows(bob, QUERY), "access")
    assert rows(bob, "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname = %s", (DATASET,)) == []
print("ok: no grant is refused, and bob's catalog does not show the dataset")
with connect("carol", f"{token('carol')}:{totp('carol')}") as carol:
    refused(lambda: rows(carol, QUERY), "access")
print("ok: an ended grant is refused")
with connect("erin", f"{token('erin')}:{totp('erin')}") as erin:
    rows(erin, QUERY)
    refused(lambda: rows(erin, QUERY), "budget")
print("ok: an exhausted budget is refused")
alice.close()
