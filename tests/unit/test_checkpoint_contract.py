"""Start-up refuses a checkpoint whose state was built with other rule settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraudstream.settings import DetectorSettings, SettingsError, load_settings
from spark_job.app import check_checkpoint
from spark_job.rules import RuleConfig


def settings_for(tmp_path: Path, *flags: str) -> DetectorSettings:
    settings, _ = load_settings(DetectorSettings, ["--checkpoint-dir", str(tmp_path), *flags], {})
    return settings


def test_same_settings_reuse_the_checkpoint(tmp_path: Path) -> None:
    first = settings_for(tmp_path)
    check_checkpoint(first, RuleConfig.from_settings(first))
    check_checkpoint(first, RuleConfig.from_settings(first))  # no error the second time


def test_changed_window_is_refused_with_the_setting_named(tmp_path: Path) -> None:
    first = settings_for(tmp_path)
    check_checkpoint(first, RuleConfig.from_settings(first))
    changed = settings_for(tmp_path, "--velocity-window-seconds", "90")
    with pytest.raises(SettingsError) as error:
        check_checkpoint(changed, RuleConfig.from_settings(changed))
    assert error.value.key == "CHECKPOINT_DIR"
    assert "velocity_window_us: 60000000 -> 90000000" in error.value.message
