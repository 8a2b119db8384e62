"""`ray job submit ... -- python jobs/train.py [--config configs/X.yaml] [overrides]`.

The same options as `alro train`. With no --config it is the README's main job: the quickstart
config (SmolLM2-135M on the embedded synthetic data), local Ray when no cluster is given.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without install

from alro_ray.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("train", sys.argv[1:], ROOT / "configs" / "quickstart.yaml"))
