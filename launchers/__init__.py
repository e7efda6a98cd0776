"""Start a smolcluster cluster on its real hosts.

    python -m launchers.ssh check  --cluster lan-example            # preflight every node
    python -m launchers.ssh launch --cluster lan-example algo=syncps train.steps=500
    python -m launchers.ssh serve  --cluster lan-example checkpoint=RUN_DIR stages=2   # inference stages
    python -m launchers.slurm script --cluster lan-example --run-dir /shared/run algo=allreduce > job.sbatch

``cluster_file``  what a cluster file says: which role runs where, reached how (SSH user, port,
                  key, Python, working dir); validated before anything starts
``remote``        one role on one host: the shell command run over SSH, its log stream, stopping it
``preflight``     the checks run before training (SSH, Python and packages, port, reachability, clock,
                  memory, speed); ``python -m launchers.preflight --local`` for this machine
``resources``     what a node offers: RAM, its cgroup's memory limit, VRAM, a measured matmul speed
``ssh``           the command line: ``check``, ``launch`` (training) and ``serve`` (inference stages)
``slurm``         an sbatch script with one Slurm task per role, and the task's own start-up

On one machine, ``python -m smolcluster.train algo=syncps`` starts everything itself
(``smolcluster/launch/local.py``); on Slurm, ``hydra/launcher=slurm`` (conf/hydra/launcher/) runs
one-node jobs, and ``launchers.slurm`` one run over several nodes.
"""
