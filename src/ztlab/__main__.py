from ztlab.cli.main import main

main()
