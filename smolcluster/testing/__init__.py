"""Emulated hosts and links for tests and benchmarks; not used by a training or serving run.

- ``netns``: hosts as Linux network namespaces on a bridge (:class:`~smolcluster.testing.netns.Lan`), each
  link shaped with ``tc tbf``; ``netns_unavailable`` says why a machine cannot (tests skip, benches refuse).
"""
