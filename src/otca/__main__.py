import sys

from otca.cli import main

sys.exit(main())
