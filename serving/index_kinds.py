"""The index kinds an export builds per cluster (``dnc export --index``, ``serving.index``)
and the share of a ScaNN tree's leaves each search visits.

A module of its own, without TensorFlow, so that parsers and configs can list them.
"""

INDEX_KINDS = ("scann", "brute-force")
# Share of the leaves searched in each cluster's index (``bench/scann_sweep.py``), and in
# the one index over every item (plain variants; ``dnc``'s score merge at prompt weight
# 0). A query about one interest finds its neighbours in few leaves of that global tree,
# which splits every cluster into many more leaves: at 1M low-rank items 5% of its 1,000
# leaves keep recall@100 as high as 20% do, for less search time
# (docs/serving-results.md, "One index over all items").
LEAVES_FRACTION = 0.2
GLOBAL_LEAVES_FRACTION = 0.05
