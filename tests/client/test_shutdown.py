"""A program that ends with SDK work still running ends cleanly.

``asyncio.run()`` cancels every task left when ``main`` returns, all at once,
then closes the loop. A task left holding a session (an agent cancelled but
not awaited, a Ctrl-C) must not make the SDK open a new connection while it
is torn down: such a connection's tasks are never awaited, and the program
prints ``Task was destroyed but it is pending!`` and ``aclose(): asynchronous
generator is already running`` on its way out.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests._await import finished

ROOT = Path(__file__).resolve().parents[2]

#: The quickstart's agent example as it was: the agent task is cancelled, never awaited.
ABANDONED_AGENT = """
import asyncio, sys

from durable_client import Agent, Author, Session, Transcript, TurnEnd

URL, TRANSPORT, NAME = sys.argv[1:4]


async def run_agent(ready):
    async with (
        Session(URL, NAME, author=Author.agent("echo"), transport=TRANSPORT) as session,
        Agent(session) as agent,
    ):
        ready.set()
        async for turn in agent.turns():
            async with agent.reply(turn) as reply:
                for token in (turn.text + " ") * 50:
                    await reply.write(token)
                    await asyncio.sleep(0.001)


async def main():
    ready = asyncio.Event()
    agent = asyncio.create_task(run_agent(ready))
    async with Session(URL, NAME, author=Author.user("ann"), transport=TRANSPORT) as user:
        await user.create()
        await ready.wait()
        transcript = Transcript()
        async with user.subscribe("now") as events:
            ack = await user.send_message("echo this")
            async for event in events:
                transcript.apply(event)
                reply = transcript.replies[0] if transcript.replies else None
                if reply and len(reply.text) > 20 and not reply.cancel_requested:
                    await user.cancel(ack.event.turn_id)
                if isinstance(event, TurnEnd):
                    break
        print(reply.status)
    agent.cancel()  # and main returns: asyncio.run() tears the agent down


asyncio.run(main())
"""


@pytest.mark.parametrize("transport", ["websocket", "http"])
async def test_an_agent_task_left_running_at_exit_ends_cleanly(
    ours_url: str, transport: str, tmp_path: Path
) -> None:
    program = tmp_path / "abandoned_agent.py"
    program.write_text(ABANDONED_AGENT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    for run in range(3):  # it failed on every run; three runs leave no doubt
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(program),
            ours_url,
            transport,
            f"shutdown-{transport}-{tmp_path.name}-{run}",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await finished(proc, 60)
        assert proc.returncode == 0, out.decode() + err.decode()
        assert out.decode().strip() == "cancelled"
        assert err.decode() == "", err.decode()
