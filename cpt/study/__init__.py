"""Strategy studies: shared θ0 experts (:mod:`cpt.study.expert_cache`), many variants × seeds
(:mod:`cpt.study.spec`, :mod:`cpt.study.run`, several processes: :mod:`cpt.study.workers`), the
summary from the run directories (:mod:`cpt.study.summary`) and confidence intervals
(:mod:`cpt.study.statistics`), METHOD §6."""
