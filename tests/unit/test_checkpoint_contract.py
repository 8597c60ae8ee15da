"""Start-up refuses a checkpoint whose state was built with other rule settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraudstream.settings import DetectorSettings, SettingsError, load_settings
from spark_job.app import check_checkpoint, explain_failure
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


def test_a_source_failure_is_explained_by_the_source_message_not_sparks_wrapper() -> None:
    text = ("[PYTHON_STREAMING_DATA_SOURCE_RUNTIME_ERROR] Failed when Python streaming data "
            "source perform latestOffset\nTraceback (most recent call last):\n"
            "spark_job.kafka_source.KafkaSourceError: topic 'transactions' partition 0: the "
            "broker's end offset 0 is below offset 40 already read: records were lost (broker "
            "restarted); set failOnDataLoss=false to re-read the partition from offset 0 instead")
    cause, advice = explain_failure(text)
    assert cause.startswith("topic 'transactions' partition 0") and "failOnDataLoss" not in cause
    assert "./reset.sh" in advice
    proxy = ("An exception was raised by the Python Proxy. Return Message: Traceback (most "
             "recent call last):\n  File \"plan.py\", line 180, in handle\n"
             "TypeError: to_json() missing 1 required positional argument: 'config'\n"
             "\tat py4j.Protocol.getReturnValue(Protocol.java:476)")
    assert explain_failure(proxy)[0].startswith("TypeError: to_json() missing")
    cause, advice = explain_failure("boom\nmore")
    assert (cause, advice) == ("boom", "a restart resumes from the checkpoint")
