from ple_export.cli import main

main()
