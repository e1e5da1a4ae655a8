"""Population rules: the population service (:mod:`.service`: parameter layout, seeded noise,
the vmapped population evaluator, the split across ranks) and the rules built on it (GA, ES,
ARS, CEM, CSA-ES, CMA-ES, CBO) and the hybrid CEM-RL."""
