"""crc_runtime: run a crc-fusion bundle (docs/bundle.md) with numpy, onnxruntime, Pillow and click.

Never imports torch, crc_train or crc_export.
"""
