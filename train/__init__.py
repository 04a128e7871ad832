"""Fine-tuning on real models and data (needs the `train` extra: tensorflow-cpu,
tensorflow-datasets, tokenizers, ...).

Kept import-light: submodules (`train.assets`, `train.data`, ...) are imported
explicitly, so `import train.assets` does not pull in TensorFlow.
"""
