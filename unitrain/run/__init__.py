"""Running: the Trainer (:mod:`.trainer`), its Lightning adapter, the services rules receive,
checkpoints (reading, :mod:`.checkpoint`, and writing), signals and SLURM (:mod:`.safety`), the
callbacks (progress, video), and the one use of Lightning's internals (:mod:`.lightning_compat`)."""
