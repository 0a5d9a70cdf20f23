from adaptr.cli import main

main()
