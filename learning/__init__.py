"""Offline rule learning from the vstack decision log (``python -m learning``, ``vstack learn``).

``learning.data`` reads the log into per-flow samples, ``learning.model`` builds features,
labels and the decision tree and writes ``.rules``, ``learning.learn`` is the pipeline with
its held-out report, ``learning.fossa`` searches param values over replayed traces, and
``learning.synth`` writes synthetic logs with a planted policy.
"""
