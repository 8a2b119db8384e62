"""`ray job submit ... -- python jobs/evaluate.py --checkpoint DIR --out DIR [--modes ...]`: same as `alro evaluate`."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without install

from alro_ray.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("evaluate", sys.argv[1:]))
