"""Runnable peer roles behind the ``swarm`` command (``cli``): ``seed``, ``join`` and ``demo``; ``common`` holds
logging set-up, signal handling and the one-line error convention every entry point shares."""
