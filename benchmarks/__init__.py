"""Benchmarks for issue 5: how swarm averaging and training behave on emulated wide-area links.

- ``wan``: the emulated network (one network namespace per peer, veth pairs on a bridge, tbf egress limits,
  interface byte counters, cleanup) and a link self-test.
- ``averaging`` / ``averaging_peer``: averaging rounds of 25M-125M values per codec, one hivemind peer per namespace.
- ``codec_bench``: compress/extract throughput and error of each codec beside memory-copy bandwidth.
- ``training`` / ``train_peer``: ``swarm seed`` / ``swarm join`` in namespaces (``train_peer`` times the optimizer
  step), fp32 vs 8-bit, with and without overlap, and a single-process baseline.
- ``plots``: PNG plots from the JSON rows the benchmarks write.

Results and exact commands are in ``benchmarks/RESULTS.md``; how to run them in ``benchmarks/README.md``.
"""
