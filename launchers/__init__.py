"""Start a smolcluster cluster on its real hosts.

    python -m launchers.ssh check  --cluster lan-example            # preflight every node
    python -m launchers.ssh launch --cluster lan-example algo=syncps train.steps=500

``cluster_file``  what a cluster file says: which role runs where, reached how (SSH user, port,
                  key, Python, working dir); validated before anything starts
``remote``        one role on one host: the shell command run over SSH, its log stream, stopping it
``preflight``     the checks run before training (SSH, Python and packages, port, reachability, clock)
``ssh``           the command line: ``check`` and ``launch`` (supervise, stop all on failure)

On one machine, ``python -m smolcluster.train algo=syncps`` starts everything itself
(``smolcluster/launch_local.py``); on Slurm, ``hydra/launcher=slurm`` (conf/hydra/launcher/).
"""
