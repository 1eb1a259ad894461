"""The chat app: one durable session, live in every terminal that joins.

Keys: Enter sends; while a reply streams, Enter *steers* it (the agent folds
your note into the reply it is writing) and ``/next …`` queues a follow-up
turn instead; Escape stops the reply (an explicit cancel, seen by every
terminal; the text so far stays, marked stopped); Ctrl+P opens the command
palette (new session, join, recent sessions, copy the id, simulate a
disconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from durable_client import (
    Author,
    DurableError,
    Member,
    PresenceUnavailable,
    ReplyStatus,
    Session,
    SteerMode,
    Transcript,
)
from durable_client.streams import DurableStream

from ._index import IndexEntry, announce, recent
from .widgets import ChatLog, Note, StatusBar, short_offset

_ADJECTIVES = (
    "amber",
    "brisk",
    "calm",
    "dusty",
    "eager",
    "fuzzy",
    "gentle",
    "hazy",
    "icy",
    "jolly",
)
_NOUNS = ("otter", "falcon", "maple", "comet", "harbor", "lantern", "meadow", "pebble", "quill")


def new_session_id() -> str:
    """A short id that is easy to read out and type in another terminal."""
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}-{secrets.randbelow(10000):04d}"


@dataclass(frozen=True)
class ChatConfig:
    server: str
    session_id: str
    user: Author
    new: bool  # start this session (create and announce it) rather than join it
    launcher: str = "python -m tui_demo"  # how the join hint tells others to start the app
    label: str = ""  # how this terminal appears in presence (default: the user's name)


class SessionHeader(Static):
    DEFAULT_CSS = """
    SessionHeader { dock: top; height: auto; max-height: 3; background: $boost; padding: 0 1; }
    """


class PromptScreen(ModalScreen[str | None]):
    """Ask for one line of text (a session id)."""

    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen > Vertical { width: 60; height: auto; border: round $accent; padding: 1 2; }
    """
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question)
            yield Input(placeholder="amber-otter-0042")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class RecentScreen(ModalScreen[str | None]):
    """Pick one of the server's recent sessions."""

    DEFAULT_CSS = """
    RecentScreen { align: center middle; }
    RecentScreen > Vertical { width: 70; height: 20; border: round $accent; padding: 0 1; }
    """
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, entries: list[IndexEntry]) -> None:
        super().__init__()
        self.entries = entries

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Recent sessions (Enter joins, Escape closes)")
            options = [
                Option(f"{e.session_id}  {e.title[:40]}", id=e.session_id) for e in self.entries
            ]
            yield OptionList(*options) if options else Static("No sessions on this server yet.")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class SessionCommands(Provider):
    """The command palette's session commands."""

    async def search(self, query: str) -> Hits:
        app = self.app
        assert isinstance(app, ChatApp)
        commands: list[tuple[str, Callable[[], object], str]] = [
            ("New session", app.action_new_session, "start a new session"),
            ("Join session…", app.action_join_session, "join a session by id"),
            ("Recent sessions…", app.action_recent_sessions, "pick a session of this server"),
            ("Copy session id", app.action_copy_session_id, "to the clipboard"),
            ("Simulate a disconnect", app.action_simulate_disconnect, "drop the connection"),
        ]
        matcher = self.matcher(query)
        for name, callback, help_text in commands:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)


class ChatApp(App[None]):
    """The chat app. Uses only the public ``durable_client`` API."""

    TITLE = "durable chat"
    COMMANDS = App.COMMANDS | {SessionCommands}
    CSS = """
    #composer { margin: 0 1; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop reply", show=True),
        Binding("ctrl+n", "new_session", "New session", show=False),
        Binding("ctrl+q", "quit", "Quit", show=True, priority=True),
    ]

    def __init__(self, config: ChatConfig) -> None:
        super().__init__()
        self.config = config
        self.session_id = config.session_id
        self.session: Session | None = None
        self.transcript = Transcript()
        self.members: tuple[Member, ...] = ()
        self._new = config.new

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield SessionHeader(id="session-header")
        yield ChatLog(self.config.user.id)
        yield Input(placeholder="Message (Enter sends; Escape stops a reply)", id="composer")
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#composer", Input).focus()
        self.start_session()

    @property
    def chat(self) -> ChatLog:
        return self.query_one(ChatLog)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    def join_hint(self) -> str:
        command = f"{self.config.launcher} --session {self.session_id}"
        if self.config.server != "http://127.0.0.1:4437":
            command += f" --server {self.config.server}"
        return command

    def _show_header(self) -> None:
        header = Text.assemble(
            ("session ", "dim"),
            (self.session_id, "bold"),
            ("\njoin from another terminal: ", "dim"),
            (self.join_hint(), "bold"),
        )
        self.query_one(SessionHeader).update(header)
        self.sub_title = self.session_id

    # ------------------------------------------------------------------ the session

    def start_session(self) -> None:
        self._show_header()
        self.transcript = Transcript()
        self.members = ()
        self.run_session(self.session_id, self._new)

    @work(exclusive=True, group="session")
    async def run_session(self, session_id: str, new: bool) -> None:
        """Subscribe to the session from its beginning and show every event, live."""
        config = self.config
        chat = self.chat
        session = Session(config.server, session_id, author=config.user)
        self.session = session
        watcher = asyncio.create_task(self._watch_status(session))
        presence: asyncio.Task[None] | None = None
        try:
            if new:
                await session.create()
                await announce(
                    config.server,
                    session_id,
                    title=f"started by {config.user.name}",
                    created_by=config.user.id,
                )
            elif not await self._exists(session.url):
                await chat.mount(
                    Note(
                        f"Session {session_id!r} was not found on {config.server}. "
                        "Check the id, or press Ctrl+N for a new session."
                    )
                )
                return
            async with session.subscribe(start="beginning") as events:
                presence = asyncio.create_task(self._presence(session))
                caught_up = False
                async for event in events:
                    # History is rendered in one go when it has all arrived; from
                    # then on every event is shown as it comes.
                    if not caught_up and events.caught_up.is_set():
                        caught_up = True
                        await chat.history_loaded()
                    self.transcript.apply(event)
                    await chat.apply(event, live=caught_up)
                    if events.position is not None:
                        self.status_bar.position = short_offset(events.position.offset)
                    self._update_agent_status()
                    if not caught_up and events.caught_up.is_set():
                        caught_up = True
                        await chat.history_loaded()
        except DurableError as exc:
            await chat.mount(Note(f"✖ {exc}"))
        finally:
            watcher.cancel()
            if presence is not None:
                presence.cancel()
            with contextlib.suppress(DurableError):
                await session.aclose()

    async def _presence(self, session: Session) -> None:
        """Join the session's presence and keep the status bar's "here" up to date."""
        try:
            changes = session.presence_changes()
            await session.set_presence("idle", label=self.config.label or None, kind="user")
            self._show_members(session.members)
            async for change in changes:
                self._show_members(change.members)
        except PresenceUnavailable:
            self.status_bar.people = "(presence needs WebSocket)"

    def _show_members(self, members: tuple[Member, ...]) -> None:
        self.members = members
        users = [m.label or m.client_id for m in members if m.kind == "user"]
        self.status_bar.people = ", ".join(users) if users else ""
        self._update_agent_status()

    async def _exists(self, url: str) -> bool:
        async with DurableStream(url) as stream:
            return await stream.exists()

    async def _watch_status(self, session: Session) -> None:
        self.status_bar.connection = session.status
        async for status in session.status_changes():
            self.status_bar.connection = status
            if status.is_final:
                return

    def _update_agent_status(self) -> None:
        self.status_bar.agents = self.agent_status()
        self.refresh_bindings()

    def agent_status(self) -> str:
        """What the agents are doing: their presence status where the server offers presence
        (``Assistant: streaming``), else derived from the log (``streaming``, ``thinking``
        while a message waits for a reply, ``idle``)."""
        agents = [m for m in self.members if m.kind == "agent"]
        if agents:
            return ", ".join(f"{m.label or m.client_id} {m.status}" for m in agents)
        for turn in reversed(self.transcript.turns):
            if any(r.status is ReplyStatus.STREAMING for r in turn.replies.values()):
                return "streaming"
            if turn.open:
                return "thinking"
        return "idle"

    def streaming_turn(self) -> str | None:
        for turn in reversed(self.transcript.turns):
            if turn.open:
                return turn.turn_id
        return None

    # ------------------------------------------------------------------ input and actions

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "composer":
            return
        text = event.value.strip()
        event.input.value = ""
        session = self.session
        if not text or session is None:
            return
        running = self.streaming_turn()
        try:
            if text.startswith("/next "):
                await session.send_message(text[len("/next ") :])
            elif running is not None:
                await session.steer(running, text, mode=SteerMode.STEER)
            else:
                await session.send_message(text)
        except DurableError as exc:
            self.notify(f"not sent: {exc}", severity="error")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.streaming_turn() is not None
        return True

    async def action_stop(self) -> None:
        turn_id = self.streaming_turn()
        if turn_id is None or self.session is None:
            return
        try:
            await self.session.cancel(turn_id, reason="stopped from the terminal")
        except DurableError as exc:
            self.notify(f"could not stop: {exc}", severity="error")

    def switch_session(self, session_id: str, *, new: bool) -> None:
        self.session_id = session_id
        self._new = new
        chat = self.chat
        chat.turns.clear()
        chat.remove_children()
        self.status_bar.position = "-"
        self.start_session()

    def action_new_session(self) -> None:
        self.switch_session(new_session_id(), new=True)

    def action_join_session(self) -> None:
        def chosen(session_id: str | None) -> None:
            if session_id:
                self.switch_session(session_id, new=False)

        self.push_screen(PromptScreen("Join which session?"), chosen)

    @work(group="recent")
    async def action_recent_sessions(self) -> None:
        try:
            entries = await recent(self.config.server)
        except DurableError as exc:
            self.notify(f"cannot list sessions: {exc}", severity="error")
            return
        choice = await self.push_screen_wait(RecentScreen(entries))
        if choice:
            self.switch_session(choice, new=False)

    def action_copy_session_id(self) -> None:
        self.copy_to_clipboard(self.session_id)
        self.notify(f"copied {self.session_id}")

    def action_simulate_disconnect(self) -> None:
        if self.session is None:
            return
        self.session.drop_connections()
        self.notify("connection dropped; watch it resume")


def default_user() -> Author:
    name = os.environ.get("USER") or "you"
    return Author.user(f"{name}-{secrets.token_hex(3)}", name)


def run_chat(config: ChatConfig) -> None:
    ChatApp(config).run()


__all__ = ["ChatApp", "ChatConfig", "default_user", "new_session_id", "run_chat"]
