"""tools/bench: the fio matrix against every exporter, measured so it holds up.

One module per concern: fio.py runs a cell from the job files in bench/,
stats.py summarises samples, peers.py says which exporters take part,
startup.py measures start-up and teardown, plot.py draws, main.py drives
it all.  A benchmark, never a test: it prints figures and fails only when it
could not measure.
"""
