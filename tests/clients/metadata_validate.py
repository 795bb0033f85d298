"""Validates a dataset's HealthDCAT-AP and Croissant exports (tests/tests/card_release.rs): both expand as
JSON-LD with pyld (no remote context is fetched: a loader that refuses every URL), the properties each
profile requires are present in the expanded graph with the right kinds of values, and mlcroissant loads the
Croissant file (its own validation of the 1.0 schema and the Responsible-AI fields).

Usage: metadata_validate.py HEALTHDCAT_AP.json CROISSANT.json. Prints one `ok: …` line per check.
"""
import json
import sys

from pyld import jsonld


def no_remote(url, options=None):
    raise RuntimeError(f"no remote context may be needed: {url}")


jsonld.set_document_loader(no_remote)

DCAT = "http://www.w3.org/ns/dcat#"
DCT = "http://purl.org/dc/terms/"
HEALTH = "http://healthdataportal.eu/ns/health#"
DPV = "https://w3id.org/dpv#"
XSD = "http://www.w3.org/2001/XMLSchema#"
SCHEMA = "https://schema.org/"
CR = "http://mlcommons.org/croissant/"
RAI = "http://mlcommons.org/croissant/RAI/"


def expand(path):
    with open(path) as f:
        doc = json.load(f)
    expanded = jsonld.expand(doc)
    assert len(expanded) == 1, expanded
    return doc, expanded[0]


def values(node, prop):
    v = node.get(prop)
    assert v, f"{prop} missing"
    return v


def literal(node, prop, datatype=None):
    for v in values(node, prop):
        assert "@value" in v, f"{prop} is not a literal: {v}"
        if datatype:
            assert v.get("@type") == datatype, f"{prop}: {v} is not {datatype}"
    return values(node, prop)[0]["@value"]


def resource(node, prop):
    for v in values(node, prop):
        assert "@id" in v or "@type" in v, f"{prop} is not a resource: {v}"
    return values(node, prop)


hd_path, cr_path = sys.argv[1], sys.argv[2]

doc, ds = expand(hd_path)
assert DCAT + "Dataset" in ds["@type"], ds["@type"]
literal(ds, DCT + "title")
literal(ds, DCT + "description")
publisher = resource(ds, DCT + "publisher")[0]
assert publisher.get("http://xmlns.com/foaf/0.1/name"), publisher
assert resource(ds, DCT + "accessRights")[0]["@id"].endswith("NON_PUBLIC")
temporal = resource(ds, DCT + "temporal")[0]
start = literal(temporal, DCAT + "startDate", XSD + "date")
end = literal(temporal, DCAT + "endDate", XSD + "date")
assert start <= end, (start, end)
resource(ds, DCT + "provenance")
literal(ds, DCAT + "version")
assert resource(ds, DCAT + "theme")[0]["@id"].endswith("/HEAL"), ds[DCAT + "theme"]
resource(ds, DCAT + "contactPoint")
for dist in resource(ds, DCAT + "distribution"):
    assert DCAT + "Distribution" in dist["@type"], dist
    resource(dist, DCAT + "accessURL")
resource(ds, HEALTH + "hdab")
records = literal(ds, HEALTH + "numberOfRecords", XSD + "nonNegativeInteger")
persons = literal(ds, HEALTH + "numberOfUniqueIndividuals", XSD + "nonNegativeInteger")
assert isinstance(records, int) and isinstance(persons, int), (records, persons)
literal(ds, HEALTH + "populationCoverage")
for system in resource(ds, HEALTH + "hasCodingSystem"):
    assert system["@id"].startswith("http"), system
resource(ds, HEALTH + "retentionPeriod")
resource(ds, DPV + "hasLegalBasis")
resource(ds, DPV + "hasPurpose")
resource(ds, DPV + "hasPersonalData")
print(f"ok: HealthDCAT-AP expands and has every required property ({persons} individuals, {records} records, {start}..{end})")

doc, ds = expand(cr_path)
assert SCHEMA + "Dataset" in ds["@type"], ds["@type"]
for prop in ["name", "description", "url", "license", "datePublished", "version"]:
    assert ds.get(SCHEMA + prop), f"schema:{prop} missing"
assert ds[DCT + "conformsTo"][0]["@value"] == "http://mlcommons.org/croissant/1.0", ds[DCT + "conformsTo"]
for prop in ["dataCollection", "dataCollectionTimeframe", "dataPreprocessingProtocol",
             "dataManipulationProtocol", "personalSensitiveInformation", "dataLimitations", "dataBiases"]:
    literal(ds, RAI + prop)
sets = values(ds, CR + "recordSet")
assert all(values(rs, CR + "field") for rs in sets)
print(f"ok: Croissant expands with its Responsible-AI fields and {len(sets)} record sets")

import mlcroissant as mlc  # noqa: E402  (imported late: slow, and only this check needs it)

dataset = mlc.Dataset(jsonld=cr_path)
assert dataset.metadata.name == doc["name"], dataset.metadata.name
print("ok: mlcroissant loads the Croissant file")
