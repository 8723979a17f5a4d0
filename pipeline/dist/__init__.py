"""Process groups, collectives, ZeRO-3 gathers and launcher discovery (torchrun, DeepSpeed, MPI, Slurm)."""
