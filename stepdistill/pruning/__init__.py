"""Network surgery for students of another size. Layer pruning (LAPTOP-Diff, Zhang et al. 2024): prunable units and
the stock config of a pruned network (:mod:`.structure`), the one-shot criterion (:mod:`.criterion`), what a pruned
folder holds (:mod:`.folder`) and ``stepdistill prune`` (:mod:`stepdistill.prune`, a tool on top of the trainers'
set-up). Growing: a deeper transformer with the same function (:mod:`.growth`) and ``stepdistill grow``
(:mod:`stepdistill.grow`)."""
