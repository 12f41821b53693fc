import sys

from distmaml.cli import main

sys.exit(main())
