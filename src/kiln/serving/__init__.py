"""The online half of kiln: the Open Inference Protocol over HTTP and gRPC, with dynamic batching,
a model manager, a response cache, metrics and fallback to the reference variant.

The road through this package, in the order a request travels::

    app.py / grpc_service.py   decode the wire format (protocol.py: JSON, binary tensors, BYTES); answer
                               errors as error_map.py decides, metadata as metadata.py renders it
    service.py                 validate, cache (cache.py), queue, time out, count (metrics.py)
    kiln.execution             merge queued requests into batches (batcher.py), one worker per instance;
                               run on the chosen variant, fall back to the reference fp32 one (instances.py)
    manager.py                 which versions are loaded: policy, lazy/preload, reload, unload, LRU
    server.py                  both front ends on one event loop; SIGTERM drains and exits 0
"""

from kiln.serving.settings import ServerSettings

__all__ = ["ServerSettings", "serve"]


def serve(settings: ServerSettings) -> int:
    """Run a server until SIGTERM; see :mod:`kiln.serving.server`."""
    from kiln.serving.server import serve as _serve

    return _serve(settings)
