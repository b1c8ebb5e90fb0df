"""On-device face recognition: models, detection, alignment (and, from other modules, camera and pipeline).

Heavy imports (onnxruntime, onnx, OpenCV) stay inside the submodules so that the card path and the CLI
start without them.
"""
