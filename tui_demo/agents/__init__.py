"""Agents for the chat app: session clients that answer user turns.

- ``demo``: a built-in agent that needs nothing from outside, with a helper
  sub-agent that publishes its progress straight into the session.
- ``openai``: any OpenAI-compatible chat-completions endpoint, streamed.
- ``host``: a process that runs agents for every session of a server
  (``python -m tui_demo.agents``).
"""
