"""Every experiment of the seed, one after another, into one run directory (results/all).

Run it again to continue: experiments that finished are skipped, an interrupted one is set
aside and run again, and experiments whose data or weights are missing are skipped with a
warning. Then: python analysis/report.py results/all

    python sweeps/all.py --quick --name all-quick
    python sweeps/all.py
"""

import sys

from tltune.cli import main
from tltune.experiments import FAMILIES

if __name__ == "__main__":
    sys.exit(main(FAMILIES["all"], __doc__, run_all=True))
