"""A Textual chat app on durable sessions: one session, live in every terminal that joins.

Run it with ``python -m tui_demo`` (or the ``durable-chat`` command). The app
uses only the public ``durable_client`` API; agents are session clients too
(``tui_demo.agents``), so nothing talks to a terminal directly.
"""
