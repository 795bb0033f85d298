//! A dataset's metadata for catalogues outside the enclave, as JSON-LD: **HealthDCAT-AP** (the European
//! Health Data Space profile of DCAT-AP) and **Croissant** 1.0 with its Responsible-AI vocabulary (ML
//! dataset cards). Both are built from the catalog entry and the card figures released through the DP
//! engine (`card`): the counts they carry (`healthdcatap:numberOfRecords`,
//! `healthdcatap:numberOfUniqueIndividuals`, the temporal coverage) are those noisy figures, so an export
//! is only made once a version's card was released. Nothing in them is computed from rows.
//!
//! Each document carries its own `@context` (no remote context is fetched to read it).

use serde_json::{Value, json};

use crate::card::CardFigures;
use crate::{Error, Result};
use catalog::{CardRelease, TableEntry, VersionEntry};

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// HealthDCAT-AP JSON-LD.
    HealthDcatAp,
    /// Croissant 1.0 JSON-LD with Responsible-AI fields.
    Croissant,
}

impl Format {
    /// The format called `name` (`healthdcat-ap`, `croissant`).
    pub fn parse(name: &str) -> Result<Format> {
        match name {
            "healthdcat-ap" => Ok(Format::HealthDcatAp),
            "croissant" => Ok(Format::Croissant),
            other => Err(Error::Config(format!(
                "unknown metadata format '{other}' (healthdcat-ap or croissant)"
            ))),
        }
    }
}

/// Where the enclave is reached (the distributions' access URLs and the access body's home page).
#[derive(Debug, Clone)]
pub struct Publisher {
    /// The enclave's public address, ending in `/`.
    pub base_url: String,
}

/// The coding systems a table's `code` column follows, by the table's name (Synthea and FHIR exports
/// code conditions, encounters and procedures in SNOMED CT, observations in LOINC, medications in
/// RxNorm, immunizations in CVX).
fn coding_systems(tables: &[TableEntry]) -> Vec<&'static str> {
    let mut out = Vec::new();
    for t in tables {
        if !t.columns.iter().any(|c| c.name == "code") {
            continue;
        }
        let system = match t.name.as_str() {
            "conditions" | "encounters" | "procedures" | "allergies" | "careplans" | "devices" => {
                "http://snomed.info/sct"
            }
            "observations" => "http://loinc.org",
            "medications" => "http://www.nlm.nih.gov/research/umls/rxnorm",
            "immunizations" => "http://hl7.org/fhir/sid/cvx",
            _ => continue,
        };
        if !out.contains(&system) {
            out.push(system);
        }
    }
    out
}

/// The de-identification applied, one line per column that was changed.
fn manipulation(v: &VersionEntry) -> String {
    let mut lines = vec![format!(
        "De-identified at ingest under the '{}' profile.",
        v.version.provenance.profile
    )];
    for t in &v.version.tables {
        for c in &t.columns {
            if c.action_rule() != "keep" {
                lines.push(format!("{}.{}: {}", t.name, c.name, c.action_rule()));
            }
        }
    }
    // The profile's k (a rule), never the report's exact figures (k reached, persons suppressed).
    if let Some(k) = v
        .version
        .report
        .get("k_anonymity")
        .and_then(|k| k.get("k_required"))
    {
        lines.push(format!(
            "k-anonymity required: every quasi-identifier class of at least {k} persons"
        ));
    }
    lines.join("\n")
}

fn description(v: &VersionEntry) -> String {
    let p = &v.version.provenance;
    format!(
        "De-identified hospital real-world data from {} ({}), tables {}, held encrypted in a research enclave: \
         researchers receive differentially private aggregates only, under grants of the data access board.",
        p.provider,
        p.source_system,
        v.version
            .tables
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn count(f: Option<&crate::card::Figure>) -> Option<u64> {
    f.map(|f| f.value.max(0.0).round() as u64)
}

/// The metadata document of `v` in `format`, from its released card figures.
pub fn export(
    v: &VersionEntry,
    release: &CardRelease,
    figures: &CardFigures,
    publisher: &Publisher,
    format: Format,
) -> Result<Value> {
    if release.version != v.version.version || release.dataset != v.version.dataset {
        return Err(Error::Config(
            "the card release does not belong to this version".into(),
        ));
    }
    Ok(match format {
        Format::HealthDcatAp => healthdcat_ap(v, release, figures, publisher),
        Format::Croissant => croissant(v, release, figures, publisher),
    })
}

fn healthdcat_ap(
    v: &VersionEntry,
    release: &CardRelease,
    f: &CardFigures,
    publisher: &Publisher,
) -> Value {
    let p = &v.version.provenance;
    let base = publisher.base_url.trim_end_matches('/');
    let dataset_url = format!("{base}/ui/datasets/{}", v.version.dataset);
    let date = |year: i64, end: bool| json!({"@value": format!("{year:04}-{}", if end { "12-31" } else { "01-01" }), "@type": "xsd:date"});
    let mut doc = json!({
        "@context": {
            "dcat": "http://www.w3.org/ns/dcat#",
            "dct": "http://purl.org/dc/terms/",
            "foaf": "http://xmlns.com/foaf/0.1/",
            "xsd": "http://www.w3.org/2001/XMLSchema#",
            "rdfs": "http://www.w3.org/2000/01/rdf-schema#",
            "vcard": "http://www.w3.org/2006/vcard/ns#",
            "dpv": "https://w3id.org/dpv#",
            "healthdcatap": "http://healthdataportal.eu/ns/health#"
        },
        "@id": dataset_url,
        "@type": "dcat:Dataset",
        "dct:identifier": v.version.dataset,
        "dct:title": {"@value": v.version.dataset, "@language": "en"},
        "dct:description": {"@value": description(v), "@language": "en"},
        "dcat:version": v.version.version,
        "dcat:theme": {"@id": "http://publications.europa.eu/resource/authority/data-theme/HEAL"},
        "dcat:contactPoint": {
            "@type": "vcard:Organization",
            "vcard:fn": "Data access board of this research enclave",
            "vcard:hasURL": {"@id": format!("{base}/ui/")}
        },
        "dct:issued": {"@value": v.published_at, "@type": "xsd:dateTime"},
        "dct:publisher": {"@type": "foaf:Agent", "foaf:name": p.provider},
        "dct:accessRights": {"@id": "http://publications.europa.eu/resource/authority/access-right/NON_PUBLIC"},
        "dct:provenance": {
            "@type": "dct:ProvenanceStatement",
            "rdfs:label": format!(
                "Extracted from {} at {}; de-identified under the '{}' profile and published as version {} at {}.",
                p.source_system, p.extracted_at, p.profile, v.version.version, v.published_at
            )
        },
        "dcat:distribution": v.version.tables.iter().map(|t| json!({
            "@type": "dcat:Distribution",
            "dct:title": t.name,
            "dct:format": {"@id": "http://publications.europa.eu/resource/authority/file-type/PARQUET"},
            "dcat:accessURL": {"@id": format!("{base}/api/v1/query")},
            "dct:rights": {"@type": "dct:RightsStatement", "rdfs:label": "Differentially private aggregate queries only, under a grant of the data access board."}
        })).collect::<Vec<_>>(),
        "healthdcatap:hdab": {
            "@type": "foaf:Agent",
            "foaf:name": "Data access board of this research enclave",
            "foaf:homepage": {"@id": format!("{base}/ui/")}
        },
        "healthdcatap:populationCoverage": {
            "@value": format!(
                "Patients in {}'s export ({}); consent scope: {}.",
                p.provider, p.source_system, p.consent_scope
            ),
            "@language": "en"
        },
        "healthdcatap:hasCodingSystem": coding_systems(&v.version.tables)
            .into_iter()
            .map(|s| json!({"@id": s}))
            .collect::<Vec<_>>(),
        "healthdcatap:retentionPeriod": {
            "@type": "dct:PeriodOfTime",
            "dcat:startDate": {"@value": v.published_at.get(..10).unwrap_or(&v.published_at), "@type": "xsd:date"},
            "rdfs:comment": "Kept until the data access board withdraws this version."
        },
        "dpv:hasLegalBasis": {"@type": "dpv:LegalBasis", "rdfs:label": p.legal_basis},
        "dpv:hasPurpose": [
            {"@id": "dpv:ResearchAndDevelopment"},
            {"@type": "dpv:Purpose", "rdfs:label": p.consent_scope}
        ],
        "dpv:hasPersonalData": v.version.tables.iter().flat_map(|t| t.columns.iter()
            .filter(|c| c.role != "identifier")
            .map(move |c| json!({"@type": "dpv:PersonalData", "rdfs:label": format!("{}.{} ({})", t.name, c.name, c.role)})))
            .collect::<Vec<_>>(),
        "rdfs:comment": format!(
            "Counts and coverage were released through a differentially private mechanism (ε {} over {} queries, released by the board at {}); they are noisy by design.",
            f.epsilon, f.queries, release.released_at
        )
    });
    if let Some(n) = count(f.records.as_ref()) {
        doc["healthdcatap:numberOfRecords"] =
            json!({"@value": n, "@type": "xsd:nonNegativeInteger"});
    }
    if let Some(n) = count(f.persons.as_ref()) {
        doc["healthdcatap:numberOfUniqueIndividuals"] =
            json!({"@value": n, "@type": "xsd:nonNegativeInteger"});
    }
    if let Some(c) = &f.coverage {
        doc["dct:temporal"] = json!({
            "@type": "dct:PeriodOfTime",
            "dcat:startDate": date(c.first_year, false),
            "dcat:endDate": date(c.last_year, true)
        });
    }
    doc
}

/// Croissant's data types of the catalog's Arrow types.
fn croissant_type(data_type: &str) -> &'static str {
    match data_type {
        "Int8" | "Int16" | "Int32" | "Int64" | "UInt8" | "UInt16" | "UInt32" | "UInt64" => {
            "sc:Integer"
        }
        "Float16" | "Float32" | "Float64" => "sc:Float",
        "Boolean" => "sc:Boolean",
        t if t.starts_with("Timestamp") => "sc:DateTime",
        t if t.starts_with("Date") => "sc:Date",
        _ => "sc:Text",
    }
}

fn croissant(
    v: &VersionEntry,
    release: &CardRelease,
    f: &CardFigures,
    publisher: &Publisher,
) -> Value {
    let p = &v.version.provenance;
    let base = publisher.base_url.trim_end_matches('/');
    let personal: Vec<String> = v
        .version
        .tables
        .iter()
        .flat_map(|t| {
            t.columns
                .iter()
                .filter(|c| c.role == "quasi_identifier" || c.role == "sensitive")
                .map(move |c| format!("{}.{} ({})", t.name, c.name, c.role))
        })
        .collect();
    let timeframe = f.coverage.as_ref().map_or_else(
        || "not released".to_owned(),
        |c| {
            format!(
                "{}–{} (event years, DP-released)",
                c.first_year, c.last_year
            )
        },
    );
    json!({
        "@context": {
            "@language": "en",
            "@vocab": "https://schema.org/",
            "citeAs": "cr:citeAs",
            "column": "cr:column",
            "conformsTo": "dct:conformsTo",
            "cr": "http://mlcommons.org/croissant/",
            "rai": "http://mlcommons.org/croissant/RAI/",
            "data": {"@id": "cr:data", "@type": "@json"},
            "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
            "dct": "http://purl.org/dc/terms/",
            "examples": {"@id": "cr:examples", "@type": "@json"},
            "extract": "cr:extract",
            "field": "cr:field",
            "fileProperty": "cr:fileProperty",
            "fileObject": "cr:fileObject",
            "fileSet": "cr:fileSet",
            "format": "cr:format",
            "includes": "cr:includes",
            "isLiveDataset": "cr:isLiveDataset",
            "jsonPath": "cr:jsonPath",
            "key": "cr:key",
            "md5": "cr:md5",
            "parentField": "cr:parentField",
            "path": "cr:path",
            "recordSet": "cr:recordSet",
            "references": "cr:references",
            "regex": "cr:regex",
            "repeated": "cr:repeated",
            "replace": "cr:replace",
            "sc": "https://schema.org/",
            "separator": "cr:separator",
            "source": "cr:source",
            "subField": "cr:subField",
            "transform": "cr:transform"
        },
        "@type": "sc:Dataset",
        "name": v.version.dataset,
        "description": description(v),
        "conformsTo": "http://mlcommons.org/croissant/1.0",
        "url": format!("{base}/ui/datasets/{}", v.version.dataset),
        "version": v.version.version,
        "datePublished": v.published_at.get(..10).unwrap_or(&v.published_at),
        "license": format!("{base}/ui/"),
        "isAccessibleForFree": false,
        "creator": {"@type": "sc:Organization", "name": p.provider},
        "citeAs": format!("{}, {} (version {}), {}", p.provider, v.version.dataset, v.version.version, v.published_at.get(..4).unwrap_or("")),
        "distribution": v.version.tables.iter().map(|t| json!({
            "@type": "cr:FileSet",
            "@id": format!("files-{}", t.name),
            "name": format!("files-{}", t.name),
            "description": format!("Encrypted Parquet files of table {} (readable only inside the enclave, through DP queries).", t.name),
            "encodingFormat": "application/x-parquet",
            "includes": format!("{}/*.parquet", t.name)
        })).collect::<Vec<_>>(),
        "recordSet": v.version.tables.iter().map(|t| json!({
            "@type": "cr:RecordSet",
            "@id": t.name,
            "name": t.name,
            "field": t.columns.iter().map(|c| json!({
                "@type": "cr:Field",
                "@id": format!("{}/{}", t.name, c.name),
                "name": c.name,
                "description": format!("role {}; {}", c.role, c.action_rule()),
                "dataType": croissant_type(&c.data_type),
                "source": {"fileSet": {"@id": format!("files-{}", t.name)}, "extract": {"column": c.name}}
            })).collect::<Vec<_>>()
        })).collect::<Vec<_>>(),
        "rai:dataCollection": format!("Exported by {} from {} at {}.", p.provider, p.source_system, p.extracted_at),
        "rai:dataCollectionTimeframe": timeframe,
        "rai:dataPreprocessingProtocol": format!(
            "Ingested from the provider's export: rows checked against the schema (bad rows quarantined), identifiers pseudonymised with a keyed hash, values de-identified under the '{}' profile, written as encrypted Parquet.",
            p.profile
        ),
        "rai:dataManipulationProtocol": manipulation(v),
        "rai:personalSensitiveInformation": format!(
            "Health records of real patients (legal basis: {}; consent scope: {}). Quasi-identifying and sensitive columns: {}.",
            p.legal_basis, p.consent_scope, personal.join(", ")
        ),
        "rai:dataLimitations": format!(
            "Only differentially private aggregates leave the enclave; each answer is noisy and charged to a privacy budget. Each person contributes at most {} rows to a query unless a table declares its own bound. Counts on this card are DP-released (ε {}).",
            v.version.max_contributions, f.epsilon
        ),
        "rai:dataBiases": format!(
            "One provider's patients ({}): not a sample of the general population; de-identification suppresses or coarsens rare combinations of quasi-identifiers, which under-represents small groups. Released {}.",
            p.provider, release.released_at
        )
    })
}
