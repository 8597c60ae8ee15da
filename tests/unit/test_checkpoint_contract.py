"""Start-up refuses a checkpoint whose state was built with settings it cannot follow."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraudstream.settings import DetectorSettings, SettingsError, load_settings
from spark_job.app import check_checkpoint, explain_failure


def settings_for(tmp_path: Path, *flags: str) -> DetectorSettings:
    settings, _ = load_settings(DetectorSettings, ["--checkpoint-dir", str(tmp_path), *flags], {})
    return settings


def test_same_settings_reuse_the_checkpoint(tmp_path: Path) -> None:
    first = settings_for(tmp_path)
    check_checkpoint(first)
    check_checkpoint(first)  # no error the second time


def test_rule_parameters_and_the_watermark_may_change_under_a_checkpoint(tmp_path: Path) -> None:
    """Rules are data in the state: new default parameters or a new watermark delay reuse it."""
    check_checkpoint(settings_for(tmp_path))
    check_checkpoint(settings_for(tmp_path, "--velocity-count", "5",
                                  "--velocity-window-seconds", "90", "--watermark-seconds", "30"))


@pytest.mark.parametrize(("flags", "named"), [
    (("--retention-seconds", "900"), "retention_seconds: 600.0 -> 900.0"),
    (("--state-buckets", "8"), "state_buckets: 32 -> 8"),
    (("--shuffle-partitions", "4"), "shuffle_partitions: 2 -> 4"),
    (("--rules-topic", "other-rules"), "rules_topic: fraud-rules -> other-rules"),
])
def test_what_the_state_cannot_follow_is_refused_with_the_setting_named(
        tmp_path: Path, flags: tuple[str, ...], named: str) -> None:
    check_checkpoint(settings_for(tmp_path))
    with pytest.raises(SettingsError) as error:
        check_checkpoint(settings_for(tmp_path, *flags))
    assert error.value.key == "CHECKPOINT_DIR"
    assert named in error.value.message


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
