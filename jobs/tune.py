"""`ray job submit ... -- python jobs/tune.py --config configs/X.yaml [--num-samples N] [--max-concurrent M]`.

The same options as `alro tune` (see docs/tuning.md). With no --config it runs the smoke-test
study (configs/tune_tiny.yaml), on local Ray when no cluster is given.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without install

from alro_ray.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("tune", sys.argv[1:], ROOT / "configs" / "tune_tiny.yaml"))
