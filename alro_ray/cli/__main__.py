"""`python -m alro_ray.cli`: the `alro` command."""

import sys

from alro_ray.cli import main

sys.exit(main())
