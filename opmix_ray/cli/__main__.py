"""python -m opmix_ray.cli ... (what `opmix-ray submit` and the cluster recipes run)."""
import sys

from opmix_ray.cli.main import main

sys.exit(main())
