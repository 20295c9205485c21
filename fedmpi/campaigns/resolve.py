"""``python -m fedmpi.campaigns.resolve LINE``: a SLURM task's table line with the values it takes
from other runs filled in (:func:`fedmpi.campaigns.depends.main`); jobs/fedmpi-array.sbatch calls
it for a line holding a ``KEY=<final COLUMN of FILE>`` field."""
import sys

from fedmpi.campaigns.depends import main

if __name__ == "__main__":
    sys.exit(main())
