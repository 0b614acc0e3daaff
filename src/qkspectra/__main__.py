from qkspectra.cli import main

main()
