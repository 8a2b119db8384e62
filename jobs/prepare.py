"""`ray job submit ... -- python jobs/prepare.py --dataset ... --data-dir ... --out DIR`: same as `alro prepare`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without install

from alro_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
