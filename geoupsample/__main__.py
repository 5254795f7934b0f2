from geoupsample.cli import main

main()
