"""The chat app: one durable session, live in every terminal that joins.

Keys: Enter sends; while a reply streams, Enter *steers* it (the agent folds
your note into the reply it is writing) and ``/next …`` queues a follow-up
turn instead; Escape stops the reply (an explicit cancel, seen by every
terminal; the text so far stays, marked stopped); Ctrl+N starts a new
session; Ctrl+P opens the command palette (new session, join, recent
sessions, copy the id, simulate a disconnect, rename yourself).

When an agent asks before it runs a tool, Ctrl+Y approves and Ctrl+T denies
(any terminal may answer; the first answer in the log decides). A reply
whose agent stopped responding (abandoned) or failed can be asked again
with Ctrl+R: a new turn with the same text, marked as a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from durable_client import (
    ApprovalState,
    Author,
    DurableError,
    Member,
    PresenceUnavailable,
    ReplyStatus,
    Session,
    SteerMode,
    Transcript,
    Turn,
)
from durable_client.streams import DurableStream, TokenProvider

from ._index import IndexEntry, announce, recent
from ._token import refusal
from .widgets import ChatLog, Note, StatusBar, position_label

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


def default_launcher(argv0: str | None = None) -> str:
    """How the join hint tells others to start the app: ``$DURABLE_CHAT_LAUNCHER`` if set
    (``dev.py chat`` sets it), else the way this process was started: ``durable-chat``
    for the console script, ``python -m tui_demo`` for the module."""
    override = os.environ.get("DURABLE_CHAT_LAUNCHER")
    if override:
        return override
    name = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    if name.removesuffix(".exe") == "durable-chat":
        return "durable-chat"
    return "python -m tui_demo"  # the module, or an embedding program: the one sure command


@dataclass(frozen=True)
class ChatConfig:
    server: str
    session_id: str
    user: Author
    new: bool  # start this session (create and announce it) rather than join it
    #: How the join hint tells others to start the app (default: how this one was started).
    launcher: str = field(default_factory=default_launcher)
    label: str = ""  # how this terminal appears in presence (default: the user's name)
    #: The access token for a server run with --auth (a string or a provider), if any.
    token: str | TokenProvider | None = None


#: The longest display name a rename accepts.
MAX_NAME = 40


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

    def __init__(self, question: str, placeholder: str = "amber-otter-0042") -> None:
        super().__init__()
        self.question = question
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question)
            yield Input(placeholder=self.placeholder)

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
    """The command palette's session commands, listed as soon as the palette opens."""

    def commands(self) -> Iterator[tuple[str, Callable[[], object], str]]:
        app = self.app
        assert isinstance(app, ChatApp)
        yield ("New session", app.action_new_session, "start a new session (Ctrl+N)")
        yield ("Join session…", app.action_join_session, "join a session by id")
        yield ("Recent sessions…", app.action_recent_sessions, "pick a session of this server")
        yield ("Copy session id", app.action_copy_session_id, "to the clipboard")
        yield ("Simulate a disconnect", app.action_simulate_disconnect, "drop the connection")
        yield ("Rename yourself…", app.action_rename, "the name the others see")
        # Offered only while they apply: a pending approval, a reply to ask again.
        pending = app.pending_approval()
        if pending is not None:
            tool = pending.request.tool
            yield ("Approve", app.action_approve, f"let the agent run {tool} (Ctrl+Y)")
            yield ("Deny", app.action_deny, f"do not let the agent run {tool} (Ctrl+T)")
        if app.retryable_turn() is not None:
            yield ("Retry last reply", app.action_retry, "ask the same again, a new turn (Ctrl+R)")

    async def discover(self) -> Hits:
        for name, callback, help_text in self.commands():
            yield DiscoveryHit(name, callback, text=name, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self.commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, text=name, help=help_text)


class ChatApp(App[None]):
    """The chat app. Uses only the public ``durable_client`` API."""

    TITLE = "durable chat"
    COMMANDS = App.COMMANDS | {SessionCommands}
    CSS = """
    #composer { margin: 0 1; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop reply", show=True),
        Binding("ctrl+y", "approve", "Approve", show=True),
        Binding("ctrl+t", "deny", "Deny", show=True),
        Binding("ctrl+r", "retry", "Retry", show=True),
        Binding("ctrl+n", "new_session", "New session", show=True),
        Binding("ctrl+q", "quit", "Quit", show=True, priority=True),
    ]

    def __init__(self, config: ChatConfig) -> None:
        super().__init__()
        self.config = config
        self.user = config.user  # a rename changes the name, never the id
        self.label = config.label  # this terminal in presence ("" : the user's name)
        self.session_id = config.session_id
        self.session: Session | None = None
        #: Why there is no session to send to (it does not exist, it failed), if so.
        self.unavailable: str | None = None
        self.transcript = Transcript()
        self.members: tuple[Member, ...] = ()
        self._new = config.new

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield SessionHeader(id="session-header")
        yield ChatLog(self.user)
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
        session = Session(config.server, session_id, author=self.user, token=config.token)
        self.session = session
        self.unavailable = None
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
                    token=config.token,
                )
            elif not await self._exists(session.url):
                self._lose(session)
                self.unavailable = (
                    f"there is no session {session_id!r} on {config.server}: "
                    "press Ctrl+N for a new one, or Ctrl+P to join another"
                )
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
                        self.status_bar.position = position_label(events.position.offset)
                    self._update_agent_status()
                    if not caught_up and events.caught_up.is_set():
                        caught_up = True
                        await chat.history_loaded()
        except DurableError as exc:
            self._lose(session)
            refused = self.refusal(exc)
            if refused is not None:
                self.unavailable = refused
                await chat.mount(Note(f"✖ {refused}"))
            else:
                self.unavailable = f"the session stopped: {exc}"
                await chat.mount(Note(f"✖ {exc}"))
        finally:
            watcher.cancel()
            if presence is not None:
                presence.cancel()
            with contextlib.suppress(DurableError):
                await session.aclose()

    def _lose(self, session: Session) -> None:
        """``session`` can take no messages: sending says why (``self.unavailable``)
        rather than that a closed session is closed."""
        if self.session is session:
            self.session = None

    async def _presence(self, session: Session) -> None:
        """Join the session's presence and keep the status bar's "here" up to date."""
        try:
            changes = session.presence_changes()
            await session.set_presence("idle", label=self.label or None, kind="user")
            self._show_members(session.members)
            async for change in changes:
                self._show_members(change.members)
        except PresenceUnavailable:
            self.status_bar.people = "(presence needs WebSocket)"
        except DurableError as exc:
            if self.refusal(exc) is None:
                raise
            self.status_bar.people = "(presence not allowed by the token)"

    def _show_members(self, members: tuple[Member, ...]) -> None:
        self.members = members
        self.chat.labels = {m.client_id: m.label for m in members if m.label}
        users = [m.label or m.client_id for m in members if m.kind == "user"]
        self.status_bar.people = ", ".join(users) if users else ""
        self._update_agent_status()

    async def _exists(self, url: str) -> bool:
        async with DurableStream(url, token=self.config.token) as stream:
            return await stream.exists()

    def refusal(self, exc: BaseException) -> str | None:
        """One line for an access refusal (401/403) of the server, else ``None``."""
        return refusal(exc, have_token=self.config.token is not None)

    def _failed(self, what: str, exc: DurableError) -> str:
        refused = self.refusal(exc)
        return f"{what}: {refused if refused is not None else exc}"

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

    def pending_approval(self) -> ApprovalState | None:
        """The approval request the keys answer: the oldest one still pending."""
        for turn in self.transcript.turns:
            for approval in turn.pending_approvals:
                return approval
        return None

    def retryable_turn(self) -> Turn | None:
        """The last turn, if its reply was abandoned or failed and nothing runs now
        (a reply that completed, or one you stopped, is not offered again)."""
        turns = [t for t in self.transcript.turns if t.message is not None]
        if not turns or any(t.open for t in self.transcript.turns):
            return None
        last = turns[-1]
        retryable = (ReplyStatus.ABANDONED, ReplyStatus.ERROR)
        if any(r.status in retryable for r in last.replies.values()):
            return last
        return None

    # ------------------------------------------------------------------ input and actions

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "composer":
            return
        text = event.value.strip()
        event.input.value = ""
        session = self.session
        if not text:
            return
        if session is None:
            if self.unavailable is not None:
                self.notify(f"not sent: {self.unavailable}", severity="error")
            else:
                self.notify("not sent: still connecting; try again in a moment", severity="error")
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
            self.notify(self._failed("not sent", exc), severity="error")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # False hides the key from the footer: each is shown only while it can act.
        if action == "stop":
            return self.streaming_turn() is not None
        if action in ("approve", "deny"):
            return self.pending_approval() is not None
        if action == "retry":
            return self.retryable_turn() is not None
        return True

    async def action_approve(self) -> None:
        await self._decide(approved=True)

    async def action_deny(self) -> None:
        await self._decide(approved=False)

    async def _decide(self, *, approved: bool) -> None:
        pending = self.pending_approval()
        if pending is None or self.session is None:
            return
        request = pending.request
        try:
            await self.session.approve(request.turn_id, request.request_id, approved=approved)
        except DurableError as exc:
            self.notify(self._failed("not answered", exc), severity="error")

    async def action_retry(self) -> None:
        """Ask the last turn's question again: a new turn with the same text and
        addressees, naming the turn it retries (``retry_of``)."""
        turn = self.retryable_turn()
        if turn is None or turn.message is None or self.session is None:
            return
        try:
            await self.session.send_message(
                turn.message.text, to=turn.message.to, retry_of=turn.turn_id
            )
        except DurableError as exc:
            self.notify(self._failed("not retried", exc), severity="error")

    async def action_stop(self) -> None:
        turn_id = self.streaming_turn()
        if turn_id is None or self.session is None:
            return
        try:
            await self.session.cancel(turn_id, reason="stopped from the terminal")
        except DurableError as exc:
            self.notify(self._failed("could not stop", exc), severity="error")

    def switch_session(self, session_id: str, *, new: bool) -> None:
        self.session_id = session_id
        self._new = new
        chat = self.chat
        chat.turns.clear()
        chat.remove_children()
        self.status_bar.position = ""
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
            entries = await recent(self.config.server, token=self.config.token)
        except DurableError as exc:
            self.notify(self._failed("cannot list sessions", exc), severity="error")
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

    def action_rename(self) -> None:
        def chosen(name: str | None) -> None:
            if name:
                self.rename(name)

        current = self.user.name or self.user.id
        self.push_screen(PromptScreen(f"Your name (now {current!r})?", placeholder=current), chosen)

    @work(group="rename")
    async def rename(self, name: str) -> None:
        """Take a new display name: for the messages this terminal sends from now on, and
        in presence (every terminal's "here" shows it). The participant id stays."""
        name = " ".join(name.split())
        if not name or len(name) > MAX_NAME or not name.isprintable():
            self.notify(
                f"not renamed: a name is 1 to {MAX_NAME} printable characters", severity="error"
            )
            return
        old = self.user.name or ""
        self.user = Author.user(self.user.id, name)
        # The terminal part of the label ("ada (pts/3)") stays; the name part changes.
        if self.label and old and self.label.startswith(old):
            self.label = name + self.label[len(old) :]
        else:
            self.label = ""
        self.chat.me = self.user
        session = self.session
        if session is not None:
            session.author = self.user
            with contextlib.suppress(PresenceUnavailable, DurableError):
                await session.set_presence(label=self.label or name)
        self.notify(f"you are now {name}")


def run_chat(config: ChatConfig) -> None:
    ChatApp(config).run()


__all__ = [
    "ChatApp",
    "ChatConfig",
    "default_launcher",
    "new_session_id",
    "run_chat",
]
