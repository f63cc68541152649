"""What a reload applies and how it says so, from real config files."""

from __future__ import annotations

import time
from pathlib import Path

from trio_mapper.engine.process.reload import Reloads, plan_reload
from trio_mapper.engine.process.settings import Settings, load_settings

LIMITS = {"rpm": 100, "tpm": 10_000, "max_concurrent_reqs": 1}


def settings_from(config: Path, text: str) -> Settings:
    config.write_text(text)
    return load_settings(cli=LIMITS, config_file=config, environ={"OPENAI_API_KEY": "sk-test"}, dotenv_dir=None)


def test_the_reload_line_tells_each_changed_table_field_by_field(tmp_path: Path) -> None:
    """An operator's finding: the line showed two dicts of TenantConfig reprs, every field of every tenant,
    in which the one change was hard to find."""
    config = tmp_path / "engine.toml"
    before = settings_from(
        config,
        '[models."gpt-3.5-turbo"]\nrpm = 1000\ntpm = 100000\n\n[models.gone]\nrpm = 1\ntpm = 1\n\n'
        '[tenants.batch]\npriority = "batch"\nnames = ["nightly"]\n\n'
        '[tenants.ui]\npriority = "interactive"\nuids = [1000]\n\n'
        "[prices.gpt-4o]\ninput = 2.5\noutput = 10\n",
    )
    after = settings_from(
        config,
        '[models."gpt-3.5-turbo"]\nrpm = 2000\ntpm = 100000\n\n'
        '[tenants.batch]\npriority = "batch"\nnames = ["nightly"]\nweight = 3\ntpm_cap = "25%"\n\n'
        '[tenants.ui]\npriority = "interactive"\nuids = [1000]\n\n'
        '[tenants.reports]\npriority = "batch"\nuids = [1001, 1002]\ndaily_tokens = 5000000\n\n'
        "[prices.gpt-4o]\ninput = 2.5\noutput = 12.5\n",
    )
    plan = plan_reload(before, after)
    assert plan.applied == [
        "models.gone: removed",
        'models."gpt-3.5-turbo": rpm 1000 -> 2000',
        "tenants.batch: weight 1 -> 3, tpm_cap unset -> 25%",
        "tenants.reports: added (priority batch, daily_tokens 5000000, uids [1001, 1002])",
        "prices.gpt-4o: output 10 -> 12.5",
    ]
    assert plan.refused == []
    assert plan.settings.server.tenants == after.server.tenants


def test_the_status_keeps_a_failure_until_a_reload_succeeds() -> None:
    reloads = Reloads(succeeded_at=0.0)
    assert reloads.status() == ""
    at = time.mktime((2026, 1, 2, 10, 42, 3, 0, 0, -1))
    reloads.failed_with(at, "server.rpm: expected an integer, got 'lots'; running with the previous settings")
    assert reloads.status() == (
        "reload failed at 10:42:03: server.rpm: expected an integer, got 'lots'; running with the previous settings"
    )
    reloads.succeeded(at + 60, [f"server.setting_{n} (needs a restart)" for n in range(5)])
    assert reloads.status() == (
        "reloaded at 10:43:03; not applied: server.setting_0 (needs a restart), server.setting_1 (needs a restart), "
        "server.setting_2 (needs a restart) and 2 more (see the log)"
    )
    # The keys file refused: a failure, though the settings' changes were applied (and some were not).
    reloads.failed_with(
        at + 120, "keys file k.toml is not valid TOML", not_applied=["server.rpm (the command line sets it)"]
    )
    assert reloads.status().startswith("reload failed at 10:44:03: keys file")
    reloads.succeeded(at + 180, [])
    assert reloads.status() == ""
    assert reloads.statistics() == {
        "applied": 2,
        "failed": 2,
        "succeeded_at": at + 180,
        "failure": None,
        "not_applied": [],
    }
