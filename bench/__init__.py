"""Benchmarks: ``vxnet bench`` (:func:`bench.run.run_bench`): kernel VXLAN vs vxnet."""
