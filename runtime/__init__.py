"""The on-robot node. Imports the standard library and numpy at module level; engines
(onnxruntime, tensorrt, torch) are imported only inside their backend modules."""
