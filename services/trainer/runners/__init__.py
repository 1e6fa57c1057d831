"""Jobs the worker runs that span more than one commit: a TrainOnDataset run (a commit
per Poisson step) and a privacy audit (a shadow run outside any training client).

Adapters like :mod:`tensafe.trainer.worker`, which drives them: they hold the lease,
fence every commit and write the results as the contract's messages; the privacy and
training logic they call lives in :mod:`tensafe.trainer.domain`.
"""
