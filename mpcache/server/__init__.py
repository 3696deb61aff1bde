"""``python -m mpcache.server``: a demo HTTP server on the client's side (rank 0) of one private session.

The server process holds the client's tokenizer and the request queue (``api``, ``supervisor``); it
starts and supervises the party processes (``parties``): the client, the model owner (which alone
loads the weights and shares them once, at start-up) and, with ``--dealer``, a separate dealer.
Prompts reach the client party only; the model owner learns public counts and budgets.
"""
