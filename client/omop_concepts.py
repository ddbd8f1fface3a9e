"""What the OMOP reader (`client/omop.py`) asks the database: the tables and columns it needs
(`CDM_COLUMNS`, `check_tables`), the concepts of the study's rules resolved in the site's
vocabulary (`resolve_concepts`), unit concepts as UCUM codes (`unit_codes`), and one streaming query
per CDM table (`record_query`).

Concepts resolve in one pass over the vocabularies the rules name (codes compared without dots, in
upper case; a prefix matches every code it begins), plus one `concept_ancestor` lookup for the
descendants. What each rule's concepts resolved to is reported as counts, and a concept the
vocabulary does not hold is named, so a site sees at once that a feature would be empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from client.database import DatabaseSource, DatabaseSourceError
from fedcare.omop import CdmTable, ConceptRef, ConceptSet, OmopMapping, normalize_code

DAY_ZERO = "DATE '0001-01-01'"  # (date - DAY_ZERO) + 1 is Python's date.toordinal()


class TableColumns(NamedTuple):
    id: str
    concept: str
    source_concept: str
    date: str
    value: str | None = None
    unit: str | None = None
    unit_text: str | None = None


CDM_COLUMNS: dict[CdmTable, TableColumns] = {
    CdmTable.MEASUREMENT: TableColumns("measurement_id", "measurement_concept_id", "measurement_source_concept_id",
                                       "measurement_date", "value_as_number", "unit_concept_id", "unit_source_value"),
    CdmTable.OBSERVATION: TableColumns("observation_id", "observation_concept_id", "observation_source_concept_id",
                                       "observation_date", "value_as_number", "unit_concept_id", "unit_source_value"),
    CdmTable.CONDITION: TableColumns("condition_occurrence_id", "condition_concept_id", "condition_source_concept_id",
                                     "condition_start_date"),
    CdmTable.DRUG: TableColumns("drug_exposure_id", "drug_concept_id", "drug_source_concept_id",
                                "drug_exposure_start_date"),
    CdmTable.VISIT: TableColumns("visit_occurrence_id", "visit_concept_id", "visit_source_concept_id",
                                 "visit_start_date"),
}
PERSON_COLUMNS = ("person_id", "gender_concept_id", "year_of_birth", "month_of_birth", "day_of_birth")
DRUG_EXTRA = ("drug_exposure_end_date", "days_supply")
VOCABULARY_COLUMNS = {"concept": ("concept_id", "vocabulary_id", "concept_code", "domain_id"),
                      "concept_ancestor": ("ancestor_concept_id", "descendant_concept_id")}


def _needed(table: CdmTable) -> tuple[str, ...]:
    if table is CdmTable.PERSON:
        return PERSON_COLUMNS
    columns = tuple(c for c in CDM_COLUMNS[table] if c is not None) + ("person_id",)
    return columns + (DRUG_EXTRA if table is CdmTable.DRUG else ())


def check_tables(conn: Any, source: DatabaseSource, tables: set[CdmTable]) -> None:
    """Every table and column the rules read exists and the role may SELECT it; otherwise one error
    naming the schema, table and column (or the missing privilege)."""
    wanted: dict[tuple[str, str], tuple[str, ...]] = {(source.cdm_schema, t.value): _needed(t) for t in tables}
    if CdmTable.VISIT in tables:  # reasons are looked up in the visit's conditions and observations
        for table in (CdmTable.CONDITION, CdmTable.OBSERVATION):
            key = (source.cdm_schema, table.value)
            wanted[key] = tuple(dict.fromkeys(wanted.get(key, ()) + ("visit_occurrence_id", CDM_COLUMNS[table].concept,
                                                                      CDM_COLUMNS[table].source_concept)))
    for name, columns in VOCABULARY_COLUMNS.items():
        wanted[(source.vocabulary_schema, name)] = columns
    with conn.cursor() as cur:
        for schema in dict.fromkeys((source.cdm_schema, source.vocabulary_schema)):
            cur.execute("SELECT to_regnamespace(%s) IS NOT NULL, has_schema_privilege(%s, 'USAGE') "
                        "FROM (SELECT 1) one WHERE to_regnamespace(%s) IS NOT NULL", (schema, schema, schema))
            row = cur.fetchone()
            if row is None:
                raise DatabaseSourceError(f"{source.origin}: schema {schema}: missing in database {source.dbname} "
                                          "(are cdm_schema and vocabulary_schema right?)")
            if not row[1]:
                raise DatabaseSourceError(f"{source.origin}: schema {schema}: the role {source.user} has no USAGE on "
                                          f"it (GRANT USAGE ON SCHEMA {schema} TO {source.user})")
        cur.execute("SELECT table_schema, table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = ANY(%s)", ([source.cdm_schema, source.vocabulary_schema],))
        present: dict[tuple[str, str], set[str]] = {}
        for schema, table, column in cur.fetchall():
            present.setdefault((schema, table), set()).add(column)
        for (schema, table), columns in sorted(wanted.items()):
            if (schema, table) not in present:
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}"."{table}"',))
                exists = cur.fetchone()[0]
                why = "the role may not SELECT it" if exists else "missing (are cdm_schema and vocabulary_schema right?)"
                raise DatabaseSourceError(f"{source.origin}: {schema}.{table}: {why}")
            absent = [c for c in columns if c not in present[(schema, table)]]
            if absent:
                raise DatabaseSourceError(f"{source.origin}: {schema}.{table}: missing column {', '.join(absent)} "
                                          "(an OMOP CDM v5.4 table is expected)")
            cur.execute("SELECT has_table_privilege(%s, 'SELECT')", (f'"{schema}"."{table}"',))
            if not cur.fetchone()[0]:
                raise DatabaseSourceError(f"{source.origin}: {schema}.{table}: the role {source.user} may not SELECT it")


@dataclass
class ResolvedConcepts:
    """Concept ids per concept set of the study's rules, and counts-only lines about them."""

    by_set: dict[ConceptSet, frozenset[int]]
    lines: list[str]
    not_found: list[str]

    def ids(self, concepts: ConceptSet | None) -> frozenset[int]:
        return self.by_set.get(concepts, frozenset()) if concepts is not None else frozenset()


def resolve_concepts(conn: Any, source: DatabaseSource, mapping: OmopMapping) -> ResolvedConcepts:
    from psycopg import sql

    named: list[tuple[str, ConceptSet]] = []
    for name, rule in mapping.features.items():
        named += [(name, s) for s in rule.concept_sets()]
    for i, rule in enumerate(mapping.label.any_of):
        named += [(f"label rule {i + 1}", s) for s in rule.concept_sets()]
    refs = {ref for _, s in named for ref in s.refs}
    vocabularies = sorted({ref.vocabulary for ref in refs if ref.concept_id is None})
    exact: dict[tuple[str, str], set[int]] = {}
    prefixes = [ref for ref in refs if ref.is_prefix]
    by_prefix: dict[ConceptRef, set[int]] = {ref: set() for ref in prefixes}
    ids_written = sorted({ref.concept_id for ref in refs if ref.concept_id is not None})
    existing: set[int] = set()
    schema = sql.Identifier(source.vocabulary_schema)
    with conn.cursor(name="fedcare_concepts") as cur:
        cur.itersize = 50_000
        # only the candidate rows cross the wire: a real vocabulary holds millions of concepts
        codes = sorted({normalize_code(ref.code) for ref in refs if ref.concept_id is None and not ref.is_prefix})
        patterns = sorted({_like_prefix(normalize_code(ref.code)) for ref in prefixes})
        cur.execute(sql.SQL("SELECT concept_id, vocabulary_id, concept_code FROM {}.concept "
                            "WHERE concept_id = ANY(%(ids)s) OR (vocabulary_id = ANY(%(vocabularies)s) AND ("
                            "upper(replace(concept_code, '.', '')) = ANY(%(codes)s) OR "
                            "upper(replace(concept_code, '.', '')) LIKE ANY(%(patterns)s)))").format(schema),
                    {"ids": ids_written, "vocabularies": vocabularies, "codes": codes, "patterns": patterns})
        for concept_id, vocabulary, code in cur:
            existing.add(concept_id)
            if code is None:
                continue
            text = normalize_code(code)
            exact.setdefault((vocabulary, text), set()).add(concept_id)
            for ref in prefixes:
                if ref.vocabulary == vocabulary and text.startswith(normalize_code(ref.code)):
                    by_prefix[ref].add(concept_id)
    direct: dict[ConceptRef, set[int]] = {}
    for ref in refs:
        if ref.concept_id is not None:
            direct[ref] = {ref.concept_id} if ref.concept_id in existing else set()
        elif ref.is_prefix:
            direct[ref] = by_prefix[ref]
        else:
            direct[ref] = exact.get((ref.vocabulary, normalize_code(ref.code)), set())
    with_descendants = sorted({i for _, s in named if s.descendants for ref in s.refs for i in direct[ref]})
    children: dict[int, set[int]] = {}
    if with_descendants:
        with conn.cursor(name="fedcare_ancestors") as cur:
            cur.itersize = 50_000
            cur.execute(sql.SQL("SELECT ancestor_concept_id, descendant_concept_id FROM {}.concept_ancestor "
                                "WHERE ancestor_concept_id = ANY(%s)").format(schema), (with_descendants,))
            for ancestor, descendant in cur:
                children.setdefault(ancestor, set()).add(descendant)
    by_set: dict[ConceptSet, frozenset[int]] = {}
    lines, not_found = [], []
    for name, concepts in named:
        ids: set[int] = set()
        parts = []
        for ref in concepts.refs:
            own = direct[ref]
            more = set().union(*(children.get(i, set()) for i in own)) - own if concepts.descendants else set()
            ids |= own | more
            if not own:
                not_found.append(f"{name}: {ref.describe()} is not in {source.vocabulary_schema}.concept")
            parts.append(f"{ref.describe()} {len(own)}" + (f"+{len(more)} descendants" if more else ""))
        by_set[concepts] = frozenset(ids)
        lines.append(f"{name}: {len(ids)} concept{'' if len(ids) == 1 else 's'} ({'; '.join(parts)})")
    return ResolvedConcepts(by_set=by_set, lines=lines, not_found=not_found)


def _like_prefix(code: str) -> str:
    """A LIKE pattern matching every code that begins with `code` (its own % and _ taken literally)."""
    return code.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def unit_codes(conn: Any, source: DatabaseSource) -> dict[int, str]:
    """UCUM unit concepts (and other Unit-domain concepts) as their codes."""
    from psycopg import sql

    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT concept_id, concept_code FROM {}.concept WHERE vocabulary_id = 'UCUM' "
                            "OR domain_id = 'Unit'").format(sql.Identifier(source.vocabulary_schema)))
        return {concept_id: code for concept_id, code in cur.fetchall() if code}


def record_query(source: DatabaseSource, table: CdmTable, *, windows: list[tuple[list[int], int, int]],
                 reasons: list[frozenset[int]]) -> tuple[Any, dict[str, Any]]:
    """The streaming query of one table: rows (person_id, record id, concept, source concept, day,
    end day, value, unit concept, unit text, reason flags...) of records whose concept or source
    concept is in one of `windows`' concept lists and dated in that window's (lo, hi] (day ordinals;
    drugs: supplies overlapping it). Each rule has its own window, so no row that feeds no rule is fetched."""
    import datetime

    from psycopg import sql

    c = CDM_COLUMNS[table]
    schema = sql.Identifier(source.cdm_schema)
    col = sql.Identifier
    day = sql.SQL("CASE WHEN isfinite({d}) THEN ({d} - " + DAY_ZERO + ") + 1 END").format(d=col(c.date))
    if table is CdmTable.DRUG:  # an infinite end date gives -1: quarantined as a supply that does not end
        end = sql.SQL("CASE WHEN NOT isfinite(drug_exposure_end_date) THEN -1 "
                      "WHEN drug_exposure_end_date IS NOT NULL THEN (drug_exposure_end_date - " + DAY_ZERO + ") + 2 "
                      "WHEN days_supply > 0 THEN ({} - " + DAY_ZERO + ") + 1 + days_supply "
                      "ELSE ({} - " + DAY_ZERO + ") + 2 END").format(col(c.date), col(c.date))
        window = ("{d} <= %(hi{k})s AND ({d} > %(lo{k})s "  # started in the window (the reader checks its end)
                  "OR COALESCE(drug_exposure_end_date, {d} + COALESCE(days_supply, 1)) >= %(lo{k})s)")
    else:
        end = sql.SQL("NULL::int")
        window = "{d} > %(lo{k})s AND {d} <= %(hi{k})s"
    params: dict[str, Any] = {}
    matches = []
    for k, (concepts, lo, hi) in enumerate(windows):
        params.update({f"c{k}": concepts, f"lo{k}": datetime.date.fromordinal(lo),
                       f"hi{k}": datetime.date.fromordinal(hi)})
        matches.append(sql.SQL("((t.{concept} = ANY(%(c{k})s) OR t.{source_concept} = ANY(%(c{k})s)) AND "
                               + window + ")").format(
            concept=col(c.concept), source_concept=col(c.source_concept), d=col(c.date), k=sql.SQL(str(k))))
    value = col(c.value) if c.value else sql.SQL("NULL::float8")
    unit = col(c.unit) if c.unit else sql.SQL("NULL::int")
    unit_text = col(c.unit_text) if c.unit_text else sql.SQL("NULL::text")
    flags = []
    for k, ids in enumerate(reasons):
        params[f"r{k}"] = sorted(ids)
        flags.append(sql.SQL(
            "(EXISTS (SELECT 1 FROM {s}.condition_occurrence r WHERE r.visit_occurrence_id = t.visit_occurrence_id "
            "AND (r.condition_concept_id = ANY(%({k})s) OR r.condition_source_concept_id = ANY(%({k})s))) OR "
            "EXISTS (SELECT 1 FROM {s}.observation r WHERE r.visit_occurrence_id = t.visit_occurrence_id "
            "AND (r.observation_concept_id = ANY(%({k})s) OR r.observation_source_concept_id = ANY(%({k})s))))"
        ).format(s=schema, k=sql.SQL(f"r{k}")))
    query = sql.SQL("SELECT t.person_id, t.{id}, t.{concept}, t.{source_concept}, {day}, {end}, {value}, {unit}, "
                    "{unit_text}{flags} FROM {schema}.{table} t WHERE {matches}"
                    ).format(id=col(c.id), concept=col(c.concept), source_concept=col(c.source_concept), day=day,
                             end=end, value=value, unit=unit, unit_text=unit_text,
                             flags=sql.SQL("").join(sql.SQL(", ") + f for f in flags),
                             schema=schema, table=col(table.value), matches=sql.SQL(" OR ").join(matches))
    return query, params
