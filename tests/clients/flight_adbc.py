"""ADBC's Flight SQL driver against `enclave serve`: pandas and polars answers with their DP metadata, the
catalog, a prepared statement, and every refusal the gateway issue lists. Driven by tests/tests/gateway_flight.rs.

Environment: ENCLAVE_FLIGHT (grpc://host:port) and, per user U in ALICE BOB CAROL ERIN, ENCLAVE_<U>_TOKEN and
ENCLAVE_<U>_TOTP (base32 secret). Prints one `ok: …` line per check; any failure raises.
"""
import json
import os

import adbc_driver_flightsql.dbapi as flight_sql
import pandas as pd
import polars as pl

from enclave_credentials import token, totp

URI = os.environ["ENCLAVE_FLIGHT"]
QUERY = ('SELECT p.gender, COUNT(*) AS n FROM "demo-cohort".encounters e '
         'JOIN "demo-cohort".patients p ON e.person_id = p.person_id GROUP BY p.gender')


def connect(user, password, dataset=None):
    kwargs = {"username": user, "password": password}
    if dataset:
        kwargs["adbc.flight.sql.rpc.call_header.x-enclave-dataset"] = dataset
    return flight_sql.connect(URI, db_kwargs=kwargs)


def refused(fn, *needles):
    try:
        fn()
    except Exception as e:  # ADBC raises its own DatabaseError subclasses
        text = str(e)
        assert all(n in text for n in needles), f"expected {needles} in: {text}"
        return e
    raise AssertionError(f"expected a refusal naming {needles}")


def receipt_of(error):
    """The signed receipt a recorded refusal carries in its gRPC metadata (ADBC's error details)."""
    for key, value in getattr(error, "details", None) or []:
        if key in ("enclave-receipt", b"enclave-receipt"):
            return json.loads(value)
    raise AssertionError(f"no receipt in the refusal's details: {getattr(error, 'details', None)}")


def run(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table()


# Sign-in: without the TOTP code, with a wrong one; then the right one, then the same one again.
refused(lambda: run(connect("alice", token("alice")), "SELECT COUNT(*) FROM \"demo-cohort\".patients"), "session")
print("ok: no TOTP code is refused")
code = totp("alice")
wrong = "%06d" % ((int(code) + 1) % 1_000_000)
wrong_code = refused(lambda: run(connect("alice", f"{token('alice')}:{wrong}"), "SELECT 1"), "credentials")
assert len(receipt_of(wrong_code)["signature"]) == 128
print("ok: a wrong TOTP code is refused, with the signed receipt of its record")
alice = connect("alice", f"{token('alice')}:{code}")
table = run(alice, QUERY)
refused(lambda: run(connect("alice", f"{token('alice')}:{code}"), "SELECT 1"), "replayed-code")
print("ok: a replayed TOTP code is refused")

# A DP answer with its metadata, in pandas and polars.
assert table.column_names == ["gender", "n", "n_ci_low", "n_ci_high"], table.column_names
meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
cost = json.loads(meta["enclave.cost"])
budget = json.loads(meta["enclave.budget"])
assert abs(cost["epsilon"] - 0.1) < 1e-9, cost
assert budget["spent_epsilon"] > 0, budget
assert json.loads(meta["enclave.noise"])[0]["column"] == "n"
assert int(meta["enclave.audit_seq"]) > 0
receipt = json.loads(meta["enclave.receipt"])
assert receipt["seq"] == int(meta["enclave.audit_seq"]) and len(receipt["signature"]) == 128, receipt
frame = table.to_pandas()
assert isinstance(frame, pd.DataFrame) and len(frame) == 4, frame
assert (frame["n_ci_low"] <= frame["n_ci_high"]).all()
frame = pl.from_arrow(table)
assert frame.columns == ["gender", "n", "n_ci_low", "n_ci_high"]
print(f"ok: a DP answer with intervals and metadata (cost {cost}, budget spent {budget['spent_epsilon']})")

# The dataset from the call header; a prepared statement.
with connect("alice", f"{token('alice')}:{totp('alice', 1)}", dataset="demo-cohort") as conn:
    t = run(conn, "SELECT COUNT(*) AS patients FROM patients")
    assert t.column_names == ["patients", "patients_ci_low", "patients_ci_high"], t.column_names
    with conn.cursor() as cur:
        # Prepared: checked and planned, nothing charged; run when executed. No parameters.
        assert cur.adbc_prepare("SELECT AVG(base_cost) AS cost FROM encounters") is None
        cur.execute("SELECT AVG(base_cost) AS cost FROM encounters")
        t = cur.fetch_arrow_table()
        assert t.column_names == ["cost", "cost_ci_low", "cost_ci_high"] and t.num_rows == 1, t
    print("ok: the header's default dataset and a prepared statement")

# The catalog: the datasets alice may query, their tables and columns, no row counts.
objects = alice.adbc_get_objects(depth="columns").read_all().to_pylist()
schemas = [s["db_schema_name"] for c in objects for s in (c["catalog_db_schemas"] or [])]
assert schemas == ["demo-cohort"], schemas
tables = [t["table_name"] for c in objects for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]]
assert "encounters" in tables and "patients" in tables, tables
schema = alice.adbc_get_table_schema("encounters", db_schema_filter="demo-cohort")
assert "person_id" in schema.names, schema
print(f"ok: the catalog lists demo-cohort's tables {sorted(tables)}")

# Refusals: row-level, no grant, an ended grant, budget exhaustion.
row_level = refused(lambda: run(alice, 'SELECT * FROM "demo-cohort".patients'), "row-level")
receipt = receipt_of(row_level)
assert receipt["seq"] > 0 and len(receipt["signature"]) == 128, receipt
print("ok: a row-level query is refused, with its signed receipt")
with connect("bob", f"{token('bob')}:{totp('bob')}") as bob:
    refused(lambda: run(bob, QUERY), "access")
    objects = bob.adbc_get_objects(depth="db_schemas").read_all().to_pylist()
    assert not [s for c in objects for s in (c["catalog_db_schemas"] or [])], objects
print("ok: no grant is refused, and bob's catalog is empty")
with connect("carol", f"{token('carol')}:{totp('carol')}") as carol:
    refused(lambda: run(carol, QUERY), "access")
print("ok: an ended grant is refused")
with connect("erin", f"{token('erin')}:{totp('erin')}") as erin:
    run(erin, QUERY)
    refused(lambda: run(erin, QUERY), "budget")
print("ok: an exhausted budget is refused")
alice.close()
