"""`ray job submit ... -- python jobs/train.py [--config configs/X.yaml] [overrides]`.

The same options as `alro train`. With no --config it is the README's main job: the quickstart
config (SmolLM2-135M on the embedded synthetic data), local Ray when no cluster is given.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without install

from alro_ray.cli import main  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        args = ["--config", str(DEFAULT_CONFIG), *args]
    sys.exit(main(["train", *args]))
