from modelcollapse.cli import main

main()
