"""Speed and memory benchmarks; scripts/benchmark.py is their command line.

Each benchmark module has `run(...) -> dict` (explicit arguments; the result's `ratio` is the
figure its issue sets a goal on, raw numbers beside it) and `table(result) -> str`:

  input        the shard pipeline's clips/s against what the demo_tiny train step consumes
  train        a training step's achieved FLOP/s against a large matmul on the same device
  gradsurgery  the cost of cross-modal gradient realignment over the plain step
  sinkhorn     vatt_jax.ot.sinkhorn against ott-jax at equal marginal error
  sparsity     SViTT's edge and node sparsity: XLA memory and FLOPs of a video-encoder step

Every train step is the trainer's (`vatt_jax.train.trainer.build_program`, see train.py
`compile_step`), except sparsity's (the SViTT video encoder's gradient alone, compiled from abstract
inputs, never run); timing.py holds the shared timing and XLA cost helpers. The modules import
nothing heavy at import time (TensorFlow, the trainer, ott-jax load when a benchmark runs).
"""
