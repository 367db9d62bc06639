"""What runs a stage: request validation, batching into one onnxruntime call, the in-process cascade.

Shared by the Triton Python-backend models (thin model.py files) and by offline code, so that
Triton and in-process serving compute the same pages.
"""
