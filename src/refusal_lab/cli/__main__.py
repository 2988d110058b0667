from refusal_lab.cli.app import main

main()
