"""Layer pruning (LAPTOP-Diff, Zhang et al. 2024): prunable units and the stock config of a pruned network
(:mod:`.structure`), the one-shot criterion (:mod:`.criterion`) and ``stepdistill prune`` (:mod:`.run`)."""
