"""`ray job submit ... -- python jobs/tune.py --config configs/X.yaml [--num-samples N] [--max-concurrent M]`.

The same options as `alro tune` (see docs/tuning.md). With no --config it runs the smoke-test
study (configs/tune_tiny.yaml), on local Ray when no cluster is given.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without install

from alro_ray.cli import main  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tune_tiny.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        args = ["--config", str(DEFAULT_CONFIG), *args]
    sys.exit(main(["tune", *args]))
