"""A synthetic OMOP vocabulary: every concept the synthetic sites' CDM rows and the OMOP studies name.

`synthetic_vocabulary()` builds the `concept`, `concept_ancestor` and `vocabulary` rows (the same
for every site, so one vocabulary schema may serve several CDM schemas); `create_vocabulary_schema`
creates those tables (OMOP CDM v5.4 DDL, with the indexes of the OHDSI DDL) and `write_vocabulary`
loads them with COPY.

It covers the terminology of the FHIR renderer (`simulations/fhir_vocabulary.py`): every LOINC and
ICD-10-CM code it displays (the distractors included) with their ICD-10-CM 3-character categories,
the RxNorm ingredients and their ATC classes at every level (1st to 5th), the UCUM units it writes,
the Visit concepts of its encounter classes, gender, the type concepts of the CDM rows, and the
site-local concept `fedcare|area-deprivation-index`.

Concept ids: the real Athena ids where they are well known (8507 MALE, 8532 FEMALE, 9201 Inpatient
Visit, 9202 Outpatient Visit, 9203 Emergency Room Visit); every other concept a local id from
2,000,000,001 up (the OHDSI convention for site-local concepts) with its real vocabulary_id and
concept_code, assigned in a fixed order so every build gives the same ids. As in Athena, LOINC,
RxNorm, UCUM, Visit, Gender and the local concept are standard ('S'), ATC classes are
classifications ('C'), ICD-10-CM codes are source concepts (no standard flag), and concept_ancestor
holds ATC class > ... > ATC 5th level > RxNorm ingredient plus a self row for every standard and
classification concept.
"""

from __future__ import annotations

import datetime
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from simulations.fhir_vocabulary import ATC, DISPLAYS, DRUGS, ICD10, LOINC, RXNORM, UNIT_VARIANTS

log = logging.getLogger(__name__)

FIRST_LOCAL_ID = 2_000_000_001
MALE, FEMALE = 8507, 8532
VISIT_IP, VISIT_OP, VISIT_ER = 9201, 9202, 9203
VALID_START, VALID_END = datetime.date(1970, 1, 1), datetime.date(2099, 12, 31)
# FHIR code system -> OMOP vocabulary_id
VOCABULARY_OF_SYSTEM = {LOINC: "LOINC", ICD10: "ICD10CM", RXNORM: "RxNorm", ATC: "ATC",
                        "http://unitsofmeasure.org": "UCUM"}
# FHIR Encounter.class (v3 ActCode) -> the Visit concept's code
VISIT_OF_CLASS = {"IMP": "IP", "AMB": "OP", "EMER": "ER", "VR": "TELE", "HH": "HOME"}
ADI_CODE = "area-deprivation-index"

_VOCABULARIES = (  # vocabulary_id, name, reference
    ("Gender", "OMOP Gender", "OMOP generated"),
    ("Visit", "OMOP Visit", "OMOP generated"),
    ("Type Concept", "OMOP Type Concept", "OMOP generated"),
    ("LOINC", "Logical Observation Identifiers Names and Codes (Regenstrief Institute)", "http://loinc.org"),
    ("ICD10CM", "International Classification of Diseases, Tenth Revision, Clinical Modification (NCHS)",
     "http://www.cdc.gov/nchs/icd/icd10cm.htm"),
    ("RxNorm", "RxNorm (NLM)", "http://www.nlm.nih.gov/research/umls/rxnorm"),
    ("ATC", "WHO Anatomic Therapeutic Chemical Classification", "http://www.whocc.no/atc_ddd_index/"),
    ("UCUM", "Unified Code for Units of Measure (Regenstrief Institute)", "http://unitsofmeasure.org"),
    ("fedcare", "fedcare site-local concepts", "https://fedcare.example/omop"),
)
_VISITS = ((VISIT_IP, "IP", "Inpatient Visit"), (VISIT_OP, "OP", "Outpatient Visit"),
           (VISIT_ER, "ER", "Emergency Room Visit"), (None, "TELE", "Telehealth"), (None, "HOME", "Home Visit"))
TYPE_CONCEPTS = ("EHR", "EHR encounter record", "EHR prescription", "EHR problem list", "EHR encounter diagnosis",
                 "Survey", "Patient self-report")
_ICD10_CATEGORIES = {
    "E11": "Type 2 diabetes mellitus", "F10": "Alcohol related disorders", "F11": "Opioid related disorders",
    "F12": "Cannabis related disorders", "F13": "Sedative, hypnotic, or anxiolytic related disorders",
    "F14": "Cocaine related disorders", "F15": "Other stimulant related disorders",
    "F16": "Hallucinogen related disorders", "F17": "Nicotine dependence", "F18": "Inhalant related disorders",
    "F19": "Other psychoactive substance related disorders", "F20": "Schizophrenia",
    "F31": "Bipolar disorder", "F32": "Depressive episode", "F33": "Major depressive disorder, recurrent",
    "F40": "Phobic anxiety disorders", "F41": "Other anxiety disorders",
    "F43": "Reaction to severe stress, and adjustment disorders", "G89": "Pain, not elsewhere classified",
    "I10": "Essential (primary) hypertension", "I21": "Acute myocardial infarction", "J18": "Pneumonia, unspecified organism",
    "J45": "Asthma", "K35": "Acute appendicitis", "M54": "Dorsalgia", "R07": "Pain in throat and chest",
    "R45": "Symptoms and signs involving emotional state",
    "S93": "Dislocation and sprain of joints and ligaments at ankle, foot and toe level",
    "Z00": "Encounter for general examination without complaint, suspected or reported diagnosis",
}
_ATC_CLASSES = {
    "A": "ALIMENTARY TRACT AND METABOLISM", "A10": "DRUGS USED IN DIABETES",
    "A10B": "BLOOD GLUCOSE LOWERING DRUGS, EXCL. INSULINS", "A10BA": "Biguanides",
    "C": "CARDIOVASCULAR SYSTEM", "C09": "AGENTS ACTING ON THE RENIN-ANGIOTENSIN SYSTEM",
    "C09A": "ACE INHIBITORS, PLAIN", "C09AA": "ACE inhibitors, plain", "C10": "LIPID MODIFYING AGENTS",
    "C10A": "LIPID MODIFYING AGENTS, PLAIN", "C10AA": "HMG CoA reductase inhibitors",
    "N": "NERVOUS SYSTEM", "N05": "PSYCHOLEPTICS", "N05A": "ANTIPSYCHOTICS",
    "N05AH": "Diazepines, oxazepines, thiazepines and oxepines", "N05B": "ANXIOLYTICS",
    "N05BA": "Benzodiazepine derivatives", "N06": "PSYCHOANALEPTICS", "N06A": "ANTIDEPRESSANTS",
    "N06AB": "Selective serotonin reuptake inhibitors", "N06AX": "Other antidepressants",
}
_ATC_LEVELS = ((1, "ATC 1st"), (3, "ATC 2nd"), (4, "ATC 3rd"), (5, "ATC 4th"), (7, "ATC 5th"))
_UNIT_NAMES = {
    "kg": "kilogram", "[lb_av]": "pound (US and British)", "g": "gram", "cm": "centimeter", "[in_i]": "inch (international)",
    "m": "meter", "h": "hour", "min": "minute", "s": "second", "ms": "millisecond", "/min": "per minute",
    "{beats}/min": "heart beats per minute", "{score}": "score", "1": "no unit", "{#}": "number",
    "/d": "per day", "{steps}/d": "steps per day", "Cel": "degree Celsius", "[degF]": "degree Fahrenheit",
    "mm[Hg]": "millimeter mercury column", "kg/m2": "kilogram per square meter", "{tbl}": "tablet", "d": "day",
}
_SURVEYS = {"44261-6", "70274-6", "55758-7"}


@dataclass(frozen=True)
class Concept:
    concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    concept_class_id: str
    standard_concept: str | None
    concept_code: str


@dataclass
class Vocabulary:
    """The synthetic vocabulary's rows, and concept ids by (vocabulary_id, concept_code)."""

    concepts: list[Concept] = field(default_factory=list)
    ancestors: list[tuple[int, int, int, int]] = field(default_factory=list)  # ancestor, descendant, min, max
    vocabularies: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    ids: dict[tuple[str, str], int] = field(default_factory=dict)
    _next: int = FIRST_LOCAL_ID

    def add(self, vocabulary: str, code: str, name: str, domain: str, concept_class: str,
            standard: str | None, concept_id: int | None = None) -> int:
        key = (vocabulary, code)
        if key in self.ids:
            return self.ids[key]
        if concept_id is None:
            concept_id, self._next = self._next, self._next + 1
        self.concepts.append(Concept(concept_id, name[:255], domain, vocabulary, concept_class, standard, code))
        self.ids[key] = concept_id
        return concept_id

    def id(self, vocabulary: str, code: str) -> int:
        """The concept id of a code; KeyError (naming it) when the vocabulary lacks it."""
        try:
            return self.ids[(vocabulary, code)]
        except KeyError:
            raise KeyError(f"the synthetic vocabulary has no concept {vocabulary}|{code} "
                           "(add it to simulations/omop_vocabulary.py)") from None

    def of_coding(self, system: str, code: str) -> int:
        """The concept id of a FHIR coding (system URL + code)."""
        vocabulary = VOCABULARY_OF_SYSTEM.get(system)
        if vocabulary is None:
            raise KeyError(f"no OMOP vocabulary for the FHIR code system {system}")
        return self.id(vocabulary, code)

    def type_concept(self, name: str) -> int:
        return self.id("Type Concept", name)


@functools.lru_cache(maxsize=1)
def synthetic_vocabulary() -> Vocabulary:
    """The vocabulary every synthetic site uses (built once; treat it as read-only)."""
    v = Vocabulary()
    v.add("Gender", "M", "MALE", "Gender", "Gender", "S", MALE)
    v.add("Gender", "F", "FEMALE", "Gender", "Gender", "S", FEMALE)
    for concept_id, code, name in _VISITS:
        v.add("Visit", code, name, "Visit", "Visit", "S", concept_id)
    for name in TYPE_CONCEPTS:
        v.add("Type Concept", name, name, "Type Concept", "Type Concept", "S")
    for (system, code), name in DISPLAYS.items():
        if system == LOINC:
            v.add("LOINC", code, name, "Measurement", "Survey" if code in _SURVEYS else "Clinical Observation", "S")
    icd10 = sorted(code for system, code in DISPLAYS if system == ICD10)
    for category in sorted({code[:3] for code in icd10}):
        v.add("ICD10CM", category, _ICD10_CATEGORIES.get(category, f"ICD-10-CM category {category}"),
              "Condition", "3-char nonbill code" if any(c != category and c.startswith(category) for c in icd10)
              else "3-char billing code", None)
    for code in icd10:
        digits = len(code.replace(".", ""))
        domain = "Observation" if code.startswith("Z") else "Condition"
        v.add("ICD10CM", code, DISPLAYS[(ICD10, code)], domain, f"{digits}-char billing code", None)
    for drug in DRUGS:
        v.add("RxNorm", drug.rxnorm, drug.name, "Drug", "Ingredient", "S")
    for drug in DRUGS:
        chain = []
        for length, concept_class in _ATC_LEVELS:
            code = drug.atc[:length]
            name = drug.name if length == 7 else _ATC_CLASSES.get(code, f"ATC class {code}")
            chain.append(v.add("ATC", code, name, "Drug", concept_class, "C"))
        chain.append(v.id("RxNorm", drug.rxnorm))
        for i, ancestor in enumerate(chain):
            for j in range(i + 1, len(chain)):
                v.ancestors.append((ancestor, chain[j], j - i, j - i))
    units = [u.code for variants in UNIT_VARIANTS.values() for u in variants] + list(_UNIT_NAMES)
    for code in dict.fromkeys(units):
        v.add("UCUM", code, _UNIT_NAMES.get(code, code), "Unit", "Unit", "S")
    v.add("fedcare", ADI_CODE, "Area deprivation index, national percentile", "Observation", "Clinical Observation", "S")
    for vocabulary_id, name, reference in _VOCABULARIES:
        concept_id = v.add("Vocabulary", vocabulary_id, name, "Metadata", "Vocabulary", None)
        v.vocabularies.append((vocabulary_id, name, reference, "fedcare synthetic 2025-07", concept_id))
    pairs = {(a, d) for a, d, _, _ in v.ancestors}
    v.ancestors = sorted(set(v.ancestors))
    v.ancestors += [(c.concept_id, c.concept_id, 0, 0) for c in v.concepts
                    if c.standard_concept in ("S", "C") and (c.concept_id, c.concept_id) not in pairs]
    return v


# ---------------------------------------------------------------- DDL and loading

VOCABULARY_DDL = {
    "concept": """concept_id integer NOT NULL, concept_name varchar(255) NOT NULL, domain_id varchar(20) NOT NULL,
        vocabulary_id varchar(20) NOT NULL, concept_class_id varchar(20) NOT NULL, standard_concept varchar(1) NULL,
        concept_code varchar(50) NOT NULL, valid_start_date date NOT NULL, valid_end_date date NOT NULL,
        invalid_reason varchar(1) NULL, CONSTRAINT xpk_concept PRIMARY KEY (concept_id)""",
    "concept_ancestor": """ancestor_concept_id integer NOT NULL, descendant_concept_id integer NOT NULL,
        min_levels_of_separation integer NOT NULL, max_levels_of_separation integer NOT NULL,
        CONSTRAINT xpk_concept_ancestor PRIMARY KEY (ancestor_concept_id, descendant_concept_id)""",
    "vocabulary": """vocabulary_id varchar(20) NOT NULL, vocabulary_name varchar(255) NOT NULL,
        vocabulary_reference varchar(255) NULL, vocabulary_version varchar(255) NULL,
        vocabulary_concept_id integer NOT NULL, CONSTRAINT xpk_vocabulary PRIMARY KEY (vocabulary_id)""",
}
VOCABULARY_INDEXES = (  # (index name, table, columns): those of the OHDSI v5.4 PostgreSQL DDL
    ("idx_concept_code", "concept", "concept_code"),
    ("idx_concept_vocabluary_id", "concept", "vocabulary_id"),
    ("idx_concept_domain_id", "concept", "domain_id"),
    ("idx_concept_class_id", "concept", "concept_class_id"),
    ("idx_concept_ancestor_id_1", "concept_ancestor", "ancestor_concept_id"),
    ("idx_concept_ancestor_id_2", "concept_ancestor", "descendant_concept_id"),
)


def create_tables(conn: Any, schema: str, ddl: dict[str, str], indexes: tuple[tuple[str, str, str], ...]) -> None:
    """CREATE SCHEMA IF NOT EXISTS, then each table of `ddl` and each index (fails if a table exists)."""
    from psycopg import sql

    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        for table, columns in ddl.items():
            conn.execute(sql.SQL("CREATE TABLE {}.{} ({})").format(
                sql.Identifier(schema), sql.Identifier(table), sql.SQL(columns)))
        for name, table, columns in indexes:
            conn.execute(sql.SQL("CREATE INDEX {} ON {}.{} ({})").format(
                sql.Identifier(name), sql.Identifier(schema), sql.Identifier(table),
                sql.SQL(", ").join(sql.Identifier(c.strip()) for c in columns.split(","))))


def create_vocabulary_schema(conn: Any, schema: str) -> None:
    """Create `schema` (if absent) with the vocabulary tables concept, concept_ancestor, vocabulary."""
    create_tables(conn, schema, VOCABULARY_DDL, VOCABULARY_INDEXES)


def copy_rows(conn: Any, schema: str, table: str, columns: tuple[str, ...], rows: Any) -> int:
    """COPY `rows` (tuples in `columns` order) into schema.table; returns how many."""
    from psycopg import sql

    statement = sql.SQL("COPY {}.{} ({}) FROM STDIN").format(
        sql.Identifier(schema), sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)))
    n = 0
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            n += 1
    return n


def vocabulary_written(conn: Any, schema: str) -> bool:
    """Whether `schema.concept` exists and holds rows (a vocabulary schema shared by several sites)."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".concept',)).fetchone()
    if not row[0]:
        return False
    from psycopg import sql

    return bool(conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {}.concept)").format(sql.Identifier(schema))).fetchone()[0])


def write_vocabulary(conn: Any, schema: str) -> dict[str, int]:
    """Load the synthetic vocabulary into the (empty) tables of `schema`; returns rows per table."""
    v = synthetic_vocabulary()
    with conn.transaction():
        counts = {
            "concept": copy_rows(conn, schema, "concept", (
                "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "standard_concept",
                "concept_code", "valid_start_date", "valid_end_date", "invalid_reason"),
                ((c.concept_id, c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id, c.standard_concept,
                  c.concept_code, VALID_START, VALID_END, None) for c in v.concepts)),
            "concept_ancestor": copy_rows(conn, schema, "concept_ancestor", (
                "ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation",
                "max_levels_of_separation"), v.ancestors),
            "vocabulary": copy_rows(conn, schema, "vocabulary", (
                "vocabulary_id", "vocabulary_name", "vocabulary_reference", "vocabulary_version",
                "vocabulary_concept_id"), v.vocabularies),
        }
    log.info("vocabulary %s: %s", schema, counts)
    return counts


__all__ = ["Concept", "Vocabulary", "create_vocabulary_schema", "synthetic_vocabulary", "write_vocabulary"]
