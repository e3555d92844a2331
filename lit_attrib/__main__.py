from lit_attrib.cli import main

main()
