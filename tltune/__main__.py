import sys

from tltune.command import main

sys.exit(main())
