"""Profiling tools: the memory planner (:mod:`.plan`), measured training memory (:mod:`.memory`), the per-phase
step profile (:mod:`.train_profile`) and the GPU check (:mod:`.gpu_check`). Each reads memory through the one
meter, :mod:`stepdistill.meter`, as the trainer and ``stepdistill bench`` do."""
