from symconvert.cli import run

run()
