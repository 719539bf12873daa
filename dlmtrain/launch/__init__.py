"""Launching training: SLURM batch jobs (slurm.py, templates/slurm.sbatch), `dlmtrain submit`
(submit.py) and its --local twin. Sweeps as job arrays use the same template (dlmtrain/sweep.py)."""
