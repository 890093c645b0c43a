"""How a loaded model runs: instances in threads or processes, the dynamic batcher, admission.

Both :mod:`kiln.bench` and :mod:`kiln.serving` drive a model through this package, so it knows nothing of
HTTP, gRPC or reports: values such as the batching policy are passed in by the caller.
"""
