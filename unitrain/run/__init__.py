"""Running: the Trainer (:mod:`.trainer`), its Lightning adapter, the services rules receive,
checkpoints (reading, :mod:`.checkpoint`, and writing), signals and SLURM (:mod:`.safety`), and
the callbacks (progress, video)."""
