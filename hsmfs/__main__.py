from hsmfs.cli import main

main()
