from symconvert.cli.app import run

run()
