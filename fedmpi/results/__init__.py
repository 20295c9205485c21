"""Results files: writing them during a run (:mod:`.writer`), reading them (:mod:`.reader`),
grouping runs into settings (:mod:`.groups`), ``fedmpi info`` (:mod:`.info`) and the tables over
many runs (:mod:`.tables`)."""
from fedmpi.results.groups import RunGroup, group_key, group_runs
from fedmpi.results.info import info_text
from fedmpi.results.reader import (
    RunResult,
    column_families,
    experiment_name,
    family_member,
    read_run,
    read_runs,
    unreadable_message,
)
from fedmpi.results.tables import (
    BudgetRow,
    BudgetSummary,
    best_within_upload,
    budget_summary,
    budget_table,
    mask_table,
    format_bytes,
    format_seconds,
    markdown_table,
    mean_std,
    summarize_table,
)
from fedmpi.results.writer import (
    CLIENT_FIELDS,
    NON_IDENTITY_KEYS,
    ROUND_FIELDS,
    ResultsWriter,
    checkpoint_path,
    config_identity,
    now_iso,
    run_attrs,
    run_status,
)

__all__ = [
    "BudgetRow", "BudgetSummary", "CLIENT_FIELDS", "NON_IDENTITY_KEYS", "ROUND_FIELDS",
    "ResultsWriter", "RunGroup", "RunResult", "best_within_upload", "budget_summary",
    "budget_table", "mask_table", "checkpoint_path", "column_families", "config_identity", "experiment_name",
    "family_member", "format_bytes", "format_seconds", "group_key", "group_runs", "info_text",
    "markdown_table", "mean_std", "now_iso", "read_run", "read_runs", "run_attrs", "run_status",
    "summarize_table", "unreadable_message",
]
