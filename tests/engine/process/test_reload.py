"""What a reload applies and how it says so, from real config files."""

from __future__ import annotations

from pathlib import Path

from trio_mapper.engine.process.reload import plan_reload
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
