from csnet.cli import run

run()
