"""Starting and supervising processes: one interface, its backends, and the policies every launcher shares.

``supervisor``  :class:`~.supervisor.Supervisor`, the interface (start roles, relay their output, wait until a
                state, the first failure stops the rest, SIGTERM unwinds like Ctrl-C), and its local backend
                :class:`~.supervisor.Children`; the SSH backend is ``launchers/ssh.py`` ``Launch``, the node-agent
                backend ``node/coordinator.py`` ``Run``
``local``       every role of a run as children on this machine: the star (server + workers), a ring's ranks,
                mp's stages
``nodes``       where each rank / stage lives (host, port, bind, device, threads), from the cluster config
``threads``     the thread policy: processes sharing the cores split them; ``OMP_NUM_THREADS`` wins
``overrides``   the override filter: what of the user's command line reaches the roles (and what an agent takes)
``cli``         the CLI error wrapper every command's main runs under (a user error: one line, exit 2)
"""
