from vstack.cli import main

main()
