import os
import sys

from ple_export.cli import main

try:
    main()
except SystemExit as e:
    # After a handled Ctrl-C, CPython under `-m` may re-raise SIGINT at exit (exit -2 instead of 130).
    if e.code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    raise
