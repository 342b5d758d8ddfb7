from swtool.cli import run

run()
