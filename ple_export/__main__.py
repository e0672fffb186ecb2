from ple_export.launch import main

main()
