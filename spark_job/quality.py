"""``python -m spark_job.quality``: the per-rule precision/recall report of
:mod:`fraudstream.quality` over the detector's Parquet history, under the detector's settings."""

from fraudstream.quality import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
