import sys

from tsopsd_cli.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
