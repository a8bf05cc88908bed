"""The reference pages name exactly what the code has: config keys, metrics, flow-record
fields. Both ways: nothing undocumented, nothing documented that does not exist."""

from __future__ import annotations

import ast
import re

from enforcer.observe.metrics import PREFIX, SPEC
from enforcer.runtime.supervisor import SUPERVISOR_METRICS
from tests.docs.configkeys import literal_key_sets, traced, traced_keys
from tests.docs.mdblocks import DOCS, ROOT

CONFIG_DOC = ROOT / "docs/configuration.md"
OBSERVABILITY_DOC = ROOT / "docs/observability.md"
DESIGN_DOC = ROOT / "docs/design.md"
KEY_ROW = re.compile(r"^\| `([a-z_][a-z0-9_<>\[\].]*)` \|", re.M)
METRIC_ROW = re.compile(r"^\| `(enforcer_[a-z0-9_]+)` \| (counter|gauge|histogram) \|", re.M)
FIELD_ROW = re.compile(r"^\| `([a-z_]+)` \|", re.M)
METRIC_NAME = re.compile(r"\benforcer_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def documented_keys() -> set[str]:
    return set(KEY_ROW.findall(CONFIG_DOC.read_text()))


def test_the_trace_reaches_every_key_list_of_the_loader() -> None:
    """Guards the test below: a section the maximal config misses would go unchecked."""
    seen = {allowed for _, allowed in traced()}
    missing = literal_key_sets() - seen - {("rulesets",)}  # the rulesets file: same keys
    assert not missing, f"extend tests/docs/configkeys.py MAXIMAL to reach {missing}"


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    code, docs = traced_keys(), documented_keys()
    assert not code - docs, f"config keys missing from docs/configuration.md: {sorted(code - docs)}"
    assert not docs - code, f"docs/configuration.md names keys the loader does not accept: {sorted(docs - code)}"


def code_metrics() -> dict[str, str]:
    """Every process's metrics (SPEC) and the supervisor's own (with ``workers``)."""
    every = {name: spec[0] for name, spec in SPEC.items()} | SUPERVISOR_METRICS
    return {PREFIX + name: kind for name, kind in every.items()}


def test_metric_table_is_the_code() -> None:
    rows = dict(METRIC_ROW.findall(OBSERVABILITY_DOC.read_text()))
    assert rows == code_metrics()


def test_every_metric_name_in_the_docs_exists() -> None:
    """Queries, alerts and prose anywhere in the docs name only real series."""
    names = set(code_metrics())
    series = names | {n + s for n, kind in code_metrics().items() if kind == "histogram"
                      for s in HISTOGRAM_SUFFIXES}
    for path in DOCS:
        for found in METRIC_NAME.findall(path.read_text()):
            assert found in series, f"{path.relative_to(ROOT)}: no metric {found}"


def test_design_contract_lists_every_metric() -> None:
    text = DESIGN_DOC.read_text()
    contract = text[text.index("**Metrics**"):]
    contract = contract[:contract.index("\n\n")]
    assert set(METRIC_NAME.findall(contract)) == set(code_metrics())


def record_fields() -> set[str]:
    """The top-level keys ``flowrecord.build`` writes: its dict literal plus ``detail``."""
    tree = ast.parse((ROOT / "enforcer/dataplane/flowrecord.py").read_text())
    build = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "build")
    keys: set[str] = set()
    for node in ast.walk(build):
        if isinstance(node, ast.Dict):
            keys |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
        if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                and isinstance(node.ctx, ast.Store)):
            keys.add(node.slice.value)
    return keys


def test_flow_record_fields_are_documented() -> None:
    text = OBSERVABILITY_DOC.read_text()
    table = text[text.index("| field | meaning |"):]
    table = table[:table.index("\n\n")]
    documented = {f for f in FIELD_ROW.findall(table)}
    fields = record_fields() - {"from_client", "to_client"}  # inside `bytes`
    assert fields <= documented, f"undocumented flow-record fields: {sorted(fields - documented)}"
    assert documented <= fields, f"documented fields that build() does not write: {sorted(documented - fields)}"


def test_design_contract_lists_every_flow_record_field() -> None:
    text = DESIGN_DOC.read_text()
    contract = text[text.index("**Flow-record fields**"):]
    contract = contract[:contract.index("\n\n")]
    listed = set(re.findall(r"`([a-z_]+)`", contract))
    assert record_fields() - {"from_client", "to_client"} <= listed
