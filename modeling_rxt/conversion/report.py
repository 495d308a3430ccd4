"""The conversion report: every inferred fact with its source, every conflict, default, dropped or ignored key."""

from __future__ import annotations

REPORT_NAME = "conversion_report.json"
CONVERTER_VERSION = "1"


class Report:
    """The report's JSON document (`data`) and the calls that record into it."""

    def __init__(self):
        self.data = {
            "converter": {"name": "modeling_rxt.conversion", "version": CONVERTER_VERSION},
            "inputs": {},
            "options": {},
            "inferred": {},
            "conflicts": [],
            "defaults_filled": [],
            "dropped_config_fields": [],
            "ignored_keys": [],
            "dropped_keys": [],
            "dtype_conversions": [],
            "rope_layout": {},
            "memory_attention_variant": {},
            "embedding": {},
            "token_ids": {},
            "stm_import": None,
            "notes": [],
        }

    def fact(self, component: str, field: str, value, source: str, detail: str | None = None) -> None:
        entry = {"value": value, "source": source}
        if detail:
            entry["detail"] = detail
        self.data["inferred"].setdefault(component, {})[field] = entry

    def default(self, component: str, field: str, value, note: str | None = None) -> None:
        entry = {"component": component, "field": field, "value": value}
        if note:
            entry["note"] = note
        self.data["defaults_filled"].append(entry)

    def conflict(self, component: str, field: str, config_value, used_value, note: str) -> None:
        self.data["conflicts"].append(
            {"component": component, "field": field, "config": config_value, "used": used_value, "note": note}
        )

    def compare(self, component: str, config: dict, field: str, used, note: str) -> None:
        """A conflict if `config` states `field` with a value other than `used` (the value the tensors decide)."""
        if field in config and config[field] != used:
            self.conflict(component, field, config[field], used, note)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
